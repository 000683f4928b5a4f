"""Compiled SPU programs as files on disk, with metadata and a content-addressed cache.

    definition = ProgramDef("spsa_step", step, (theta, frozen, batch, z, lr),
                     ("trainable", "frozen", "batch", "z", "step_size"),
                     ("trainable", "weights", batch_roles, "directions", "step_size"),
                     description={...})          # secfwt_jax.run.program
    art, hit = compile_cached(definition, protocols.preset("ABY3"), cache_dir)
    art = load_artifact(cache_dir / art.key)         # runs like a fresh Compiled:
    outputs = execute_artifact(art, (theta, frozen, batch, z, lr))
    SimulatorSession(preset).execute(art, [...], [...])  # or keep values shared between runs

An artifact directory holds four files (see docs/compile.md, "Artifacts and the cache"):

    executable.pb   spu_pb2.ExecutableProto, serialised
    program.pphlo   the pphlo MLIR text (secret values typed !pphlo.secret<...>)
    constants.npz   hoisted trace constants (public inputs that follow the caller's leaves;
                    the executable cannot run without them)
    metadata.json   inputs (name, shape, dtype, visibility, role), outputs, protocol, field,
                    fraction bits, compiler options, package versions, cache key, file hashes

The cache key (`compiler.cache_key`) covers the program, its inputs' roles, the preset,
the compiler options and the package versions. Entries are written to a temporary
directory and renamed into place; an entry whose files are missing or whose hashes do not
match is treated as a miss and recompiled. This module holds the disk and the cache only;
`compile.compiler` compiles, checks and keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from spu import spu_pb2

from secfwt_jax.files import file_sha256, write_atomic, write_npz_atomic, write_text_atomic
from secfwt_jax.run.program import ProgramDef

from .compiler import (
    FORMAT,
    Artifact,
    ArtifactError,
    cache_key,
    canonical_args,
    compile_program,
    decode_treedef,
    key_payload,
)
from .protocols import ProtocolPreset
from .simulator import execute

EXECUTABLE, PPHLO, CONSTANTS, METADATA = (
    "executable.pb",
    "program.pphlo",
    "constants.npz",
    "metadata.json",
)


def _write_files(artifact: Artifact, directory: Path) -> None:
    write_atomic(directory / EXECUTABLE, lambda f: f.write(artifact.executable.SerializeToString()))  # fmt: skip
    write_text_atomic(directory / PPHLO, artifact.pphlo_text)
    constants = {f"constant_{i}": c for i, c in enumerate(artifact.constants)}
    write_npz_atomic(directory / CONSTANTS, constants)
    files = {name: file_sha256(directory / name) for name in (EXECUTABLE, PPHLO, CONSTANTS)}
    metadata = {**artifact.metadata, "files": files}
    write_text_atomic(directory / METADATA, json.dumps(metadata, indent=2, sort_keys=True) + "\n")  # fmt: skip


def write_artifact(artifact: Artifact, directory: str | Path) -> Path:
    """Write the artifact's files into ``directory`` atomically: into a temporary sibling
    directory first, then renamed into place (an existing ``directory`` is replaced)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _write_files(artifact, tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, old / "entry")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_artifact(directory: str | Path) -> Artifact:
    """Read and verify an artifact directory; ``ArtifactError`` if anything is off."""
    directory = Path(directory)
    try:
        metadata = json.loads((directory / METADATA).read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(
            f"{directory}: unreadable {METADATA} ({type(error).__name__})"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ArtifactError(f"{directory}: not a {FORMAT} artifact")
    try:
        for name, digest in metadata["files"].items():
            if file_sha256(directory / name) != digest:
                raise ArtifactError(f"{directory / name}: content does not match metadata hash")
        executable = spu_pb2.ExecutableProto()
        executable.ParseFromString((directory / EXECUTABLE).read_bytes())
        with np.load(directory / CONSTANTS, allow_pickle=False) as npz:
            constants = tuple(npz[f"constant_{i}"] for i in range(len(npz.files)))
        treedef = decode_treedef(metadata["output_tree"])
    except ArtifactError:
        raise
    except Exception as error:  # missing file/key, bad protobuf, bad npz
        raise ArtifactError(f"{directory}: corrupt artifact ({type(error).__name__}: {error})") from None  # fmt: skip
    n_const = sum(1 for i in metadata["inputs"] if i["arg"] == "constant")
    if n_const != len(constants) or len(executable.input_names) != len(metadata["inputs"]):
        raise ArtifactError(f"{directory}: input count does not match the executable")
    return Artifact(executable, (directory / PPHLO).read_text(), treedef, constants, metadata)


def compile_cached(
    definition: ProgramDef,
    preset: ProtocolPreset,
    cache_dir: str | Path | None,
    copts: spu_pb2.CompilerOptions | None = None,
) -> tuple[Artifact, bool]:
    """(artifact, cache hit?) for ``definition``; compiles and stores only on a miss.

    The entry lives in ``cache_dir / key``. A corrupt or partial entry is replaced.
    Without a ``cache_dir`` it always compiles (and stores nothing).
    """
    if cache_dir is None:
        return compile_program(definition, preset, copts), False
    cache_dir = Path(cache_dir)
    key = cache_key(key_payload(definition, preset, copts))
    entry = cache_dir / key
    hit = _cached(entry, key)
    if hit is not None:
        return hit, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(key):  # processes on one host (loopback parties) compile a key once
        hit = _cached(entry, key)
        if hit is not None:
            return hit, True
        artifact = compile_program(definition, preset, copts)
        write_artifact(artifact, entry)
    return load_artifact(entry), False


def _cached(entry: Path, key: str) -> Artifact | None:
    """The stored artifact of `key`, or None (absent, corrupt or partial: recompiled)."""
    if not entry.exists():
        return None
    try:
        artifact = load_artifact(entry)
    except ArtifactError:
        return None
    return artifact if artifact.key == key else None


@contextlib.contextmanager
def _locked(key: str):
    """An exclusive advisory lock on `key` for this host, held until the block ends. The
    lock files live in the temporary directory, so a cache holds artifacts only."""
    import fcntl

    folder = Path(tempfile.gettempdir()) / "secfwt-compile-locks"
    folder.mkdir(exist_ok=True)
    with open(folder / key, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def num_outputs(program) -> int:
    """How many top-level outputs a `ProgramDef` returns (a tuple counts its items)."""
    import jax

    out = jax.eval_shape(program.fn, *program.args)
    return len(out) if isinstance(out, tuple) else 1


def secret_arguments(artifact) -> tuple[bool, ...]:
    """Whether each argument of a compiled program is secret (`metadata["arguments"]`)."""
    return tuple(a["visibility"] == "secret" for a in artifact.metadata["arguments"])


# ---------------------------------------------------------------------------- running
def preset_from_metadata(metadata: dict) -> ProtocolPreset:
    fields = {f.name for f in dataclasses.fields(ProtocolPreset)}
    kw = {k: v for k, v in metadata["protocol"].items() if k in fields}
    kw["rewrites"] = tuple(kw.get("rewrites", ()))
    return ProtocolPreset(**kw)


def execute_artifact(
    artifact: Artifact, args: Sequence[Any], preset: ProtocolPreset | None = None
) -> Any:
    """Run ``artifact`` once in the in-process simulator on ``args``; reveal the outputs.

    Inputs are shared with the visibilities recorded in the metadata; the preset defaults
    to the one the artifact was compiled for.
    """
    p = preset or preset_from_metadata(artifact.metadata)
    leaves, visibilities = artifact_inputs(artifact, args)
    flat = execute(artifact.compiled, leaves, visibilities, p).outputs
    return jax.tree_util.tree_unflatten(artifact.output_treedef, flat)


def artifact_inputs(artifact: Artifact, args: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """(input leaves, SPU visibility of each) for ``args``, checked against the shapes and
    visibilities the artifact's metadata records (one-line ValueError on a mismatch)."""
    leaves = jax.tree_util.tree_leaves(canonical_args(args))
    records = [i for i in artifact.metadata["inputs"] if i["arg"] != "constant"]
    if len(leaves) != len(records):
        raise ValueError(f"args: {len(leaves)} leaves for a program with {len(records)} inputs")
    visibilities = []
    for leaf, rec in zip(leaves, records, strict=True):
        if list(leaf.shape) != rec["shape"]:
            raise ValueError(f"{rec['name']}: shape {list(leaf.shape)}, expected {rec['shape']}")
        public = rec["visibility"] == "public"
        visibilities.append(spu_pb2.Visibility.VIS_PUBLIC if public else spu_pb2.Visibility.VIS_SECRET)  # fmt: skip
    return leaves, visibilities
