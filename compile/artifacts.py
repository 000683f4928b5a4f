"""Compiled SPU programs as files on disk, with metadata and a content-addressed cache.

    job = ProgramDef("spsa_step", step, (theta, frozen, batch, z, lr),
                     ("trainable", "frozen", "batch", "z", "step_size"),
                     ("trainable", "weights", batch_roles, "directions", "step_size"),
                     description={...})          # secfwt_jax.run.program
    art, hit = compile_cached(job, protocols.preset("ABY3"), cache_dir)
    art = load_artifact(cache_dir / art.key)         # runs like a fresh Compiled:
    outputs = run_artifact(art, (theta, frozen, batch, z, lr))
    SimulatorSession(preset).run(art, [...], [...])  # or keep values shared between runs

An artifact directory holds four files (see docs/compile.md, "Artifacts and the cache"):

    executable.pb   spu_pb2.ExecutableProto, serialised
    program.pphlo   the pphlo MLIR text (secret values typed !pphlo.secret<...>)
    constants.npz   hoisted trace constants (public inputs that follow the caller's leaves;
                    the executable cannot run without them)
    metadata.json   inputs (name, shape, dtype, visibility, role), outputs, protocol, field,
                    fraction bits, compiler options, package versions, cache key, file hashes

The cache key is the sha256 of a canonical JSON (sorted keys, no spaces) of the program
name, the job description, every input's name/shape/dtype/visibility/role, the protocol
preset, the compiler options and the package versions (including a hash of this package's
source, so an edited model never reuses a stale program). Entries are written to a
temporary directory and renamed into place; an entry whose files are missing or whose
hashes do not match is treated as a miss and recompiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from google.protobuf import json_format
from spu import spu_pb2

from secfwt_jax.files import file_sha256, write_atomic, write_npz_atomic, write_text_atomic
from secfwt_jax.run.program import ProgramDef

from . import visibility
from .compiler import Compiled, canonical_args, compile_to_pphlo, pphlo_input_types
from .protocols import ProtocolPreset
from .simulator import execute

FORMAT = "secfwt-spu-artifact/1"
EXECUTABLE, PPHLO, CONSTANTS, METADATA = (
    "executable.pb",
    "program.pphlo",
    "constants.npz",
    "metadata.json",
)
VERSIONED_PACKAGES = ("jax", "jaxlib", "spu", "flax", "optax", "secfwt-jax")


class ArtifactError(ValueError):
    """An artifact directory is missing, partial or corrupt (one-line message)."""


class Artifact(NamedTuple):
    """A compiled program plus its metadata; usable wherever a ``Compiled`` is."""

    executable: spu_pb2.ExecutableProto
    pphlo_text: str
    output_treedef: Any
    constants: tuple[np.ndarray, ...]
    metadata: dict

    @property
    def key(self) -> str:
        return self.metadata["key"]

    @property
    def compiled(self) -> Compiled:
        return Compiled(self.executable, self.pphlo_text, self.output_treedef, self.constants)


# ---------------------------------------------------------------------------- describing
@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 (16 hex) of the .py sources of secfwt_jax and secfwt_jax.compile."""
    import secfwt_jax

    h = hashlib.sha256()
    roots = [Path(secfwt_jax.__file__).parent, Path(__file__).parent]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Installed versions of the packages a compiled program depends on."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = "unknown"
    out["secfwt_jax_source"] = source_fingerprint()
    return out


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of a pytree's leaves in flattening order ('' for a bare leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def describe_inputs(job: ProgramDef, args: tuple) -> tuple[list[dict], tuple[bool, ...]]:
    """Per-leaf input records (name, arg, shape, dtype, visibility, role) and the public
    flag of each positional argument."""
    inputs, public = [], []
    for arg, arg_name, role in zip(args, job.arg_names, job.roles, strict=True):
        vis_of_arg = set()
        for path, leaf in zip(leaf_paths(arg), jax.tree_util.tree_leaves(arg), strict=True):
            leaf_role = role(path) if callable(role) else role
            vis = visibility.role_visibility(leaf_role)
            vis_of_arg.add(vis)
            inputs.append({
                "name": f"{arg_name}/{path}" if path else arg_name,
                "arg": arg_name,
                "shape": list(np.shape(leaf)),
                "dtype": np.asarray(leaf).dtype.name,
                "visibility": vis,
                "role": leaf_role,
            })  # fmt: skip
        if len(vis_of_arg) > 1:
            raise ValueError(f"roles: argument {arg_name!r} mixes secret and public leaves")
        public.append(vis_of_arg == {"public"})
    return inputs, tuple(public)


def compiler_options_dict(copts: spu_pb2.CompilerOptions) -> dict:
    return json_format.MessageToDict(
        copts, including_default_value_fields=True, preserving_proto_field_name=True
    )


def key_payload(
    job: ProgramDef, preset: ProtocolPreset, copts: spu_pb2.CompilerOptions | None = None
) -> dict:
    """Everything the cache key covers (see module doc)."""
    inputs, _ = describe_inputs(job, canonical_args(job.args))
    return {
        "format": FORMAT,
        "name": job.name,
        "job": job.description,
        "inputs": [{k: v for k, v in i.items() if k != "arg"} for i in inputs],
        "protocol": {k: v for k, v in preset.to_dict().items() if k != "trust"},
        "compiler_options": compiler_options_dict(copts or spu_pb2.CompilerOptions()),
        "versions": versions(),
    }


def cache_key(payload: dict) -> str:
    """sha256 hex of the canonical JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- output tree
def _encode_tree(node: Any, counter: list[int]) -> Any:
    if isinstance(node, _Leaf):
        counter[0] += 1
        return {"leaf": counter[0] - 1}
    if node is None:
        return {"none": None}
    if isinstance(node, dict):
        return {"dict": {str(k): _encode_tree(v, counter) for k, v in node.items()}}
    if type(node) in (tuple, list):
        return {type(node).__name__: [_encode_tree(v, counter) for v in node]}
    raise ArtifactError(
        f"outputs: {type(node).__name__} nodes cannot be stored; return dicts, tuples, lists"
    )


class _Leaf:
    pass


def _decode_tree(node: dict) -> Any:
    ((kind, value),) = node.items()
    if kind == "leaf":
        return _Leaf()
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _decode_tree(v) for k, v in value.items()}
    if kind in ("tuple", "list"):
        items = [_decode_tree(v) for v in value]
        return tuple(items) if kind == "tuple" else items
    raise ArtifactError(f"output_tree: unknown node kind {kind!r}")


def encode_treedef(treedef: Any) -> Any:
    """JSON form of a treedef made of dicts, tuples, lists and None."""
    template = jax.tree_util.tree_unflatten(treedef, [_Leaf() for _ in range(treedef.num_leaves)])
    return _encode_tree(template, [0])


def decode_treedef(encoded: Any) -> Any:
    return jax.tree_util.tree_structure(
        _decode_tree(encoded), is_leaf=lambda x: isinstance(x, _Leaf)
    )


# ---------------------------------------------------------------------------- compiling
def _identify_constant(c: np.ndarray, known: dict) -> tuple[str | None, str]:
    """(label, role) of a known array that ``c`` equals up to a non-zero scalar factor (the
    model may fold a scale into it at trace time, e.g. w / bound), else (None, "constant")."""
    c64 = np.asarray(c, np.float64)
    for label, (role, array) in known.items():
        a = np.asarray(array, np.float64)
        if a.shape != c.shape or not a.any():
            continue
        scale = float(np.vdot(a, c64) / np.vdot(a, a))
        if scale != 0 and np.allclose(c64, scale * a, rtol=1e-5, atol=1e-7):
            return (label if scale == 1 else f"{label} * {scale:.6g}"), role
    return None, "constant"


def compile_job(
    job: ProgramDef, preset: ProtocolPreset, copts: spu_pb2.CompilerOptions | None = None
) -> Artifact:
    """Compile ``job`` for ``preset`` (always calls the SPU compiler) with full metadata."""
    copts = copts if copts is not None else spu_pb2.CompilerOptions()
    args = canonical_args(job.args)
    inputs, public = describe_inputs(job, args)
    start = time.perf_counter()
    compiled = compile_to_pphlo(
        job.fn, args, public, name=job.name, copts=copts, rewrites=preset.rewrites
    )
    seconds = time.perf_counter() - start
    for i, c in enumerate(compiled.constants):
        label, role = _identify_constant(c, job.known_constants)
        inputs.append({
            "name": f"constant/{i}", "arg": "constant", "shape": list(c.shape),
            "dtype": c.dtype.name, "visibility": "public", "role": role, "label": label,
        })  # fmt: skip
    types = pphlo_input_types(compiled.pphlo_text)
    mismatches = visibility.check_inputs(types, [i["role"] for i in inputs])
    if mismatches:
        raise ValueError(f"visibility: {mismatches[0]}")
    for record, program_name in zip(inputs, compiled.executable.input_names, strict=True):
        record["program_name"] = program_name
    out_shapes = jax.eval_shape(job.fn, *args)
    outputs = [
        {"name": p or "output", "program_name": n, "shape": list(s.shape), "dtype": s.dtype.name}
        for p, n, s in zip(
            leaf_paths(out_shapes), compiled.executable.output_names,
            jax.tree_util.tree_leaves(out_shapes), strict=True,
        )
    ]  # fmt: skip
    leaks = visibility.find_declassifications(compiled.pphlo_text)
    if leaks:  # the policy: nothing secret may become public inside a program
        raise ValueError(f"visibility: {job.name} computes a public value from a secret in {len(leaks)} place(s), first: {leaks[0][:160]}")  # fmt: skip
    payload = key_payload(job, preset, copts)
    metadata = {
        "format": FORMAT,
        "key": cache_key(payload),
        "name": job.name,
        "job": job.description,
        "arguments": [
            {"name": n, "visibility": "public" if p else "secret"}
            for n, p in zip(job.arg_names, public, strict=True)
        ],
        "inputs": inputs,
        "outputs": outputs,
        "output_tree": encode_treedef(compiled.output_treedef),
        "protocol": payload["protocol"],
        "field": preset.field,
        "fxp_fraction_bits": preset.fxp_fraction_bits,
        "compiler_options": payload["compiler_options"],
        "versions": payload["versions"],
        "declassifications": 0,  # checked above
        "compile_seconds": round(seconds, 3),
        "created_unix": int(time.time()),
    }
    return Artifact(*compiled, metadata)


# ---------------------------------------------------------------------------- disk
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
    job: ProgramDef,
    preset: ProtocolPreset,
    cache_dir: str | Path,
    copts: spu_pb2.CompilerOptions | None = None,
) -> tuple[Artifact, bool]:
    """(artifact, cache hit?) for ``job``; compiles and stores only on a miss.

    The entry lives in ``cache_dir / key``. A corrupt or partial entry is replaced.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(key_payload(job, preset, copts))
    entry = cache_dir / key
    hit = _cached(entry, key)
    if hit is not None:
        return hit, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(key):  # processes on one host (loopback parties) compile a key once
        hit = _cached(entry, key)
        if hit is not None:
            return hit, True
        artifact = compile_job(job, preset, copts)
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


def run_artifact(
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
