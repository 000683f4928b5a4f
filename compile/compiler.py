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
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from spu import spu_pb2
from spu.utils import frontend as spu_fe

from .precision import DEFAULT_REWRITES, eval_jaxpr_rewritten, validate

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


__all__ = [
    "Compiled", "Public", "canonical_args", "compile_cache_stats", "compile_to_pphlo",
    "flat_visibilities", "hoist_constants", "pphlo_input_types", "public_mask",
]  # fmt: skip
