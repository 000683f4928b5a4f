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
import hashlib
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


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class WriteFailed(RuntimeError):
    """A file could not be written (a full disk, a file-size limit, an I/O error): one
    line naming the file and the OS's reason; the earlier file at that path is unchanged."""


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError that caused `error` (itself, or one in its context chain): a library
    whose cleanup fails after a failed write raises its own error from the OSError."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(error) if isinstance(error, Exception) else None
        if cause is not None and not isinstance(error, WriteFailed):
            raise WriteFailed(
                f"{path}: cannot write it ({cause.strerror or cause}); nothing of it was "
                "kept and any earlier file there is unchanged"
            ) from error
        raise


def write_atomic(
    path: str | os.PathLike, writer: Callable[[IO[bytes]], None], private: bool = False
) -> Path:
    """Call `writer(f)` on a temporary binary file beside `path`, then rename it to `path`
    (``private``: mode 0600, see the module doc)."""
    with atomic_file(path, private) as f:
        writer(f)
    return Path(path)


def write_npz_atomic(path: str | os.PathLike, arrays: dict[str, Any], private: bool = False) -> Path:  # fmt: skip
    """`np.savez` written atomically. The archive is built in memory first: a zip writer
    whose file fails mid-write (a full disk) would retry its end record when collected,
    long after, on the closed temporary file."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_atomic(path, lambda f: f.write(buffer.getbuffer()), private)


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
