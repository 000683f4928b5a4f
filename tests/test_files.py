"""Atomic writes: readers never see half a file, a failed write keeps the old one."""

import json
import os
import stat

import pytest

from secfwt_jax.files import write_atomic, write_json_atomic


def test_json_is_written_whole_and_no_temporary_file_remains(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})

    def broken(f):
        f.write(b'{"v": 2')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_public_files_follow_the_umask_and_private_ones_are_owner_only(tmp_path):
    old = os.umask(0o027)
    try:
        import importlib

        import secfwt_jax.files as files

        files = importlib.reload(files)  # PUBLIC_MODE is read at import
        public = files.write_json_atomic(tmp_path / "report.json", {"v": 1})
        private = files.write_atomic(tmp_path / "theta.npz", lambda f: f.write(b"x"), private=True)
    finally:
        os.umask(old)
        importlib.reload(files)
    assert stat.S_IMODE(public.stat().st_mode) == 0o640
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
