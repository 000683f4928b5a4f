"""Atomic writes: readers never see half a file, a failed write keeps the old one."""

import json

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
