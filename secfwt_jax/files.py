"""Atomic file writes: a temporary file in the target's folder, then a rename.

A reader (a launcher polling for a party's result, a user opening a benchmark table) never
sees a half-written file, and a failed write leaves the previous file untouched.

Permissions: a public file (a benchmark table or plot, a compiled artifact) gets what
`open` would give it, 0666 less the umask. A private one (``private=True``: anything that
holds a party's private values: its shares, the tuned parameters at their receiver, its
report, curves and checkpoint records, the model owner's seed) is readable by its owner
only, 0600, from the moment it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Mode of a public file: what `open` gives a new file under this process's umask (read
#: once at import; os.umask has no read-only form).
PUBLIC_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, private: bool = False) -> Iterator[IO[bytes]]:
    """`with atomic_file(p) as f: ...`: the same temp-fsync-rename as `write_atomic`, for a
    writer that wants a file object (SecretFlow's share dump takes such a callable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp: 0600
            yield f
            f.flush()
            if not private:
                os.fchmod(f.fileno(), PUBLIC_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(
    path: str | os.PathLike, writer: Callable[[IO[bytes]], None], private: bool = False
) -> Path:
    """Call `writer(f)` on a temporary binary file beside `path`, then rename it to `path`
    (``private``: mode 0600, see the module doc)."""
    with atomic_file(path, private) as f:
        writer(f)
    return Path(path)


def check_writable_dir(path: str | os.PathLike, field: str) -> Path:
    """Refuse, in one line naming `field`, a directory that could not be written: a file
    in its place or on its path, or a read-only nearest existing parent. Checked before
    any work, so a bad `--out` is not found after the whole run."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{field}: {probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{field}: {probe} is not writable")
    return path


def write_text_atomic(path: str | os.PathLike, text: str, private: bool = False) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()), private)


def write_json_atomic(
    path: str | os.PathLike, payload: Any, private: bool = False, **json_kwargs
) -> Path:
    """`json.dumps(payload, **json_kwargs)` written atomically (indent=2 unless given)."""
    json_kwargs.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(payload, **json_kwargs), private)
