"""Compile a JAX function to SPU bytecode (pphlo), with per-argument visibility.

Each positional argument (a pytree) is either *secret* (secret-shared) or *public* (every
party holds the plaintext), and the program is compiled with those visibilities, so
secret-public ops compile to the cheap ``*_ap`` kernels. `compile.simulator` runs what
this compiles; `compile.artifacts` checks, keys and stores it.

Static (non-array) arguments are not supported; close over them or use
``functools.partial``. Array leaves are canonicalised with ``jnp.asarray`` (float64 ->
float32, int64 -> int32 unless jax x64 is on) before tracing and sharing
(`canonical_args`).

Trace constants are hoisted into PUBLIC inputs. Arrays that ``fn`` closes over (random
feature directions, polynomial coefficients, position tables) become constants of its
jaxpr; :func:`compile_to_pphlo` passes them to the program as extra public arguments
(``Compiled.constants``, after the caller's arguments) instead of baking them into the
bytecode. Two reasons: (1) spu 0.9.3b0 miscompiles a ``dot_general`` whose constant
operand XLA has constant-folded through a transpose into a non-default layout (for
example ``einsum("bnhd,hdm->bnhm", x, w)`` with a constant ``w`` returned errors of order
1 to 30; measured here, see tests/test_compile_visibility.py); as a public input the same
op is exact. (2) The visibility policy wants public inputs such as the random-feature
directions to be named inputs of the program, which the policy checker can read.

`compile_program` is the checked front end: it compiles a `ProgramDef` for a preset, refuses a
program whose inputs are not typed as their roles say or that computes a public value from
a secret (`compile.visibility`), and returns an `Artifact` with its metadata and cache key:
the sha256 of a canonical JSON (sorted keys, no spaces) of the program name, its
description, every input's name/shape/dtype/visibility/role, the protocol preset, the
compiler options and the package versions (including a hash of this package's source, so
an edited model never reuses a stale program). `compile.artifacts` stores and caches it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf import json_format
from spu import spu_pb2
from spu.utils import frontend as spu_fe

from secfwt_jax.run.program import ProgramDef

from . import visibility
from .precision import DEFAULT_REWRITES, eval_jaxpr_rewritten, validate
from .protocols import ProtocolPreset

Public = Collection[int] | Sequence[bool]


class Compiled(NamedTuple):
    """A compiled SPU program.

    executable: ``spu_pb2.ExecutableProto`` (``.SerializeToString()`` to store it).
    pphlo_text: the pphlo MLIR text; secret values are typed ``!pphlo.secret<...>``.
    output_treedef: pytree structure of the function's output.
    constants: hoisted trace constants, public inputs that follow the caller's leaves in
        ``executable.input_names`` (feed them with :func:`constant_shares`).
    """

    executable: spu_pb2.ExecutableProto
    pphlo_text: str
    output_treedef: Any
    constants: tuple[np.ndarray, ...] = ()


def public_mask(public: Public | None, n_args: int) -> tuple[bool, ...]:
    """Normalise ``public`` to one bool per positional argument.

    Accepts a sequence of ``n_args`` bools, or a collection of argument indices.
    """
    if public is None:
        return (False,) * n_args
    items = list(public)
    if items and all(isinstance(p, bool | np.bool_) for p in items):
        if len(items) != n_args:
            raise ValueError(f"public: {len(items)} flags for {n_args} arguments")
        return tuple(bool(p) for p in items)
    idx = set()
    for p in items:
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 <= p < n_args:
            raise ValueError(f"public: bad argument index {p!r} for {n_args} arguments")
        idx.add(int(p))
    return tuple(i in idx for i in range(n_args))


def canonical_args(args: Sequence[Any]) -> tuple:
    """Each leaf as the numpy array jax would trace (float64 -> float32, ...)."""
    return tuple(jax.tree_util.tree_map(lambda x: np.asarray(jnp.asarray(x)), a) for a in args)


def flat_visibilities(args: tuple, mask: tuple[bool, ...]) -> list[int]:
    """One SPU visibility per leaf of ``args``, from one public flag per argument."""
    vis = []
    for a, pub in zip(args, mask, strict=True):
        v = spu_pb2.Visibility.VIS_PUBLIC if pub else spu_pb2.Visibility.VIS_SECRET
        vis += [v] * len(jax.tree_util.tree_leaves(a))
    return vis


_CACHE: dict[Any, Compiled] = {}
_CACHE_MAX = 64
_CACHE_STATS = {"hits": 0, "misses": 0}
_CACHE_LOCK = threading.Lock()


def compile_cache_stats() -> dict[str, int]:
    """Hits/misses/size of the compiled-program cache used by :func:`compile_to_pphlo`."""
    return {**_CACHE_STATS, "size": len(_CACHE)}


def hoist_constants(
    fn: Callable, args: Sequence[Any], *, rewrites: Sequence[str] = DEFAULT_REWRITES
) -> tuple[Callable, tuple[np.ndarray, ...], Any]:
    """Trace ``fn(*args)`` and lift its trace constants out as explicit arguments.

    Returns ``(program, constants, out_shape)``: ``program(*leaves, *constants)`` takes the
    flattened leaves of ``args`` followed by ``constants`` (numpy arrays ``fn`` closed over)
    and returns the flat list of ``fn``'s output leaves (structure: ``out_shape``), with the
    precision ``rewrites`` applied. Only shapes/dtypes of ``args`` matter (arrays or
    ``jax.ShapeDtypeStruct``). Feed ``constants`` to SPU as PUBLIC inputs: see the module
    docstring for the miscompile this avoids. Used by :func:`compile_to_pphlo` and by the
    SecretFlow backend (``secfwt_jax.runtime.cluster_run``).
    """
    rewrites = validate(rewrites)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    constants = tuple(np.asarray(c) for c in closed.consts)
    n_leaves = len(jax.tree_util.tree_leaves(args))

    def program(*flat):
        if len(flat) != n_leaves + len(constants):
            raise ValueError(
                f"program: expected {n_leaves} leaves + {len(constants)} constants, "
                f"got {len(flat)} arguments"
            )
        consts = list(flat[n_leaves:])
        return eval_jaxpr_rewritten(closed.jaxpr, consts, *flat[:n_leaves], rewrites=rewrites)

    return program, constants, out_shape


def compile_to_pphlo(
    fn: Callable,
    args: Sequence[Any],
    public: Public | None = None,
    *,
    name: str | None = None,
    copts: spu_pb2.CompilerOptions | None = None,
    rewrites: Sequence[str] = DEFAULT_REWRITES,
) -> Compiled:
    """Compile ``fn(*args)`` to SPU bytecode with the given argument visibilities.

    Only shapes/dtypes of ``args`` matter. Results are cached on (fn, name, arg
    structure/shapes/dtypes, visibilities, compiler options, rewrites) when ``fn`` is
    hashable. ``rewrites`` name precision rewrites (:mod:`secfwt_jax.compile.precision`).
    """
    rewrites = validate(rewrites)
    args = canonical_args(args)
    mask = public_mask(public, len(args))
    vis = flat_visibilities(args, mask)
    copts = copts if copts is not None else spu_pb2.CompilerOptions()
    leaves, treedef = jax.tree_util.tree_flatten(args)
    try:
        key = (fn, name, treedef, tuple((x.shape, x.dtype.str) for x in leaves), tuple(vis),
               copts.SerializeToString(), rewrites)  # fmt: skip
        hash(key)
    except TypeError:
        key = None
    with _CACHE_LOCK:
        if key is not None and key in _CACHE:
            _CACHE_STATS["hits"] += 1
            return _CACHE[key]
    _CACHE_STATS["misses"] += 1

    program, constants, out_shape = hoist_constants(fn, args, rewrites=rewrites)
    program.__name__ = re.sub(r"\W", "_", name or getattr(fn, "__name__", "program"))
    const_vis = [spu_pb2.Visibility.VIS_PUBLIC] * len(constants)
    executable, _ = spu_fe.compile(
        spu_fe.Kind.JAX,
        program,
        (*leaves, *constants),
        {},
        [f"in{i}" for i in range(len(vis) + len(constants))],
        vis + const_vis,
        lambda outs: [f"out{i}" for i in range(len(outs))],
        copts=copts,
    )
    compiled = Compiled(
        executable,
        executable.code.decode("utf-8"),
        jax.tree_util.tree_structure(out_shape),
        constants,
    )
    if key is not None:
        with _CACHE_LOCK:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = compiled
    return compiled


_MAIN_SIG = re.compile(r"func\.func @main\((?P<args>.*?)\)\s*->", re.S)


def pphlo_input_types(pphlo_text: str) -> list[str]:
    """Types of ``@main``'s arguments in order, e.g. ``["tensor<2x3x!pphlo.secret<f32>>",
    "tensor<3xf32>"]``. An argument is secret iff its type contains ``!pphlo.secret``."""
    return list(_input_types(pphlo_text))


@functools.lru_cache(maxsize=64)
def _input_types(pphlo_text: str) -> tuple[str, ...]:
    # Cached: a session checks a program's inputs on every run, and a model's text is large.
    m = _MAIN_SIG.search(pphlo_text)
    if m is None:
        raise ValueError("pphlo_text: no func.func @main signature found")
    return tuple(t.strip() for t in re.findall(r"%arg\d+:\s*([^%]+?)(?=,\s*%arg|\s*$)", m["args"]))


FORMAT = "secfwt-spu-artifact/2"
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


def describe_inputs(definition: ProgramDef, args: tuple) -> tuple[list[dict], tuple[bool, ...]]:
    """Per-leaf input records (name, arg, shape, dtype, visibility, role) and the public
    flag of each positional argument."""
    inputs, public = [], []
    for arg, arg_name, role in zip(args, definition.arg_names, definition.roles, strict=True):
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
    definition: ProgramDef, preset: ProtocolPreset, copts: spu_pb2.CompilerOptions | None = None
) -> dict:
    """Everything the cache key covers (see module doc)."""
    inputs, _ = describe_inputs(definition, canonical_args(definition.args))
    return {
        "format": FORMAT,
        "name": definition.name,
        "description": definition.description,
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


def compile_program(
    definition: ProgramDef, preset: ProtocolPreset, copts: spu_pb2.CompilerOptions | None = None
) -> Artifact:
    """Compile ``definition`` for ``preset`` (always calls the SPU compiler) with full metadata."""
    copts = copts if copts is not None else spu_pb2.CompilerOptions()
    args = canonical_args(definition.args)
    inputs, public = describe_inputs(definition, args)
    start = time.perf_counter()
    compiled = compile_to_pphlo(
        definition.fn, args, public, name=definition.name, copts=copts, rewrites=preset.rewrites
    )
    seconds = time.perf_counter() - start
    for i, c in enumerate(compiled.constants):
        label, role = _identify_constant(c, definition.known_constants)
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
    out_shapes = jax.eval_shape(definition.fn, *args)
    outputs = [
        {"name": p or "output", "program_name": n, "shape": list(s.shape), "dtype": s.dtype.name}
        for p, n, s in zip(
            leaf_paths(out_shapes), compiled.executable.output_names,
            jax.tree_util.tree_leaves(out_shapes), strict=True,
        )
    ]  # fmt: skip
    leaks = visibility.find_declassifications(compiled.pphlo_text)
    if leaks:  # the policy: nothing secret may become public inside a program
        raise ValueError(f"visibility: {definition.name} computes a public value from a secret in {len(leaks)} place(s), first: {leaks[0][:160]}")  # fmt: skip
    payload = key_payload(definition, preset, copts)
    metadata = {
        "format": FORMAT,
        "key": cache_key(payload),
        "name": definition.name,
        "description": definition.description,
        "arguments": [
            {"name": n, "visibility": "public" if p else "secret"}
            for n, p in zip(definition.arg_names, public, strict=True)
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
__all__ = [
    "FORMAT",
    "Artifact",
    "ArtifactError",
    "Compiled",
    "cache_key",
    "compile_program",
    "decode_treedef",
    "encode_treedef",
    "key_payload",
    "versions", "Public", "canonical_args", "compile_cache_stats", "compile_to_pphlo",
    "flat_visibilities", "hoist_constants", "pphlo_input_types", "public_mask",
]  # fmt: skip
