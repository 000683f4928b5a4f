"""Run a JAX function under SPU in-process, with per-argument visibility.

Parties are threads joined by an in-memory link (``libspu.link.create_mem``), one
``spu.api.Runtime`` per rank, as in ``spu.utils.simulation.Simulator``. Unlike the stock
simulator, each positional argument (a pytree) is either *secret* (secret-shared) or
*public* (every party holds the plaintext), and the program is compiled with the same
visibilities, so secret-public ops compile to the cheap ``*_ap`` kernels.

Example::

    from secfwt_jax.compile import protocols, simulator
    res = simulator.mpc_run(f, (x, z), public={1}, preset=protocols.preset("ABY3"),
                            profile=True)
    res.outputs, res.cost.total_bytes

Static (non-array) arguments are not supported; close over them or use
``functools.partial``. Array leaves are canonicalised with ``jnp.asarray`` (float64 ->
float32, int64 -> int32 unless jax x64 is on) before tracing and sharing.

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
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from spu import api as spu_api
from spu import libspu, spu_pb2
from spu.utils import frontend as spu_fe

from .cost import CommCost, capture_fds, parse_profile_log
from .precision import DEFAULT_REWRITES, eval_jaxpr_rewritten, validate
from .protocols import ProtocolPreset, check_shareable, runtime_config

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


class MpcResult(NamedTuple):
    """outputs: fn's output pytree with numpy leaves. cost: CommCost, or None unless
    profiled."""

    outputs: Any
    cost: CommCost | None


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


def _canon(args: Sequence[Any]) -> tuple:
    return tuple(jax.tree_util.tree_map(lambda x: np.asarray(jnp.asarray(x)), a) for a in args)


def _flat_vis(args: tuple, mask: tuple[bool, ...]) -> list[int]:
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
    args = _canon(args)
    mask = public_mask(public, len(args))
    vis = _flat_vis(args, mask)
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


class _Thread(threading.Thread):
    """Thread that re-raises the target's exception on join()."""

    def run(self):
        self.exc, self.ret = None, None
        try:
            self.ret = self._target(*self._args)
        except BaseException as e:  # noqa: BLE001 - re-raised in join
            self.exc = e

    def join(self, timeout=None):
        super().join(timeout)
        if self.exc is not None:
            raise self.exc
        return self.ret


def run_executable(
    executable: spu_pb2.ExecutableProto,
    shares: Sequence[Sequence[Any]],
    p: ProtocolPreset,
    profile: bool = False,
) -> list[list[Any]]:
    """Run once with all ranks as threads; ``shares[i][rank]`` is input i's share.

    Consumes ``shares``: each rank drops its share of an input (sets it to None) once its
    runtime holds a copy, so a big program peaks at one copy of its inputs' shares, not
    two (a Llama-7B layer at 32 tokens: 15.3 GB resident, 21.3 GB before).

    Returns ``outs[rank][j]``, rank's share of output j. With ``profile``, every rank
    logs its pphlo profile and rank 0 also its HAL/MPC profile (see
    :func:`secfwt_jax.compile.cost.parse_profile_log`).
    """
    n = p.world_size
    desc = libspu.link.Desc()
    for r in range(n):
        desc.add_party(f"id_{r}", f"thread_{r}")

    def party(rank: int):
        cfg = runtime_config(p, profile=profile and rank == 0)
        cfg.enable_pphlo_profile = profile
        rt = spu_api.Runtime(libspu.link.create_mem(desc, rank), cfg)
        for name, s in zip(executable.input_names, shares, strict=True):
            rt.set_var(name, s[rank])
            s[rank] = None
        rt.run(executable)
        return [rt.get_var(name) for name in executable.output_names]

    jobs = [_Thread(target=party, args=(r,)) for r in range(n)]
    for j in jobs:
        j.start()
    return [j.join() for j in jobs]


def constant_shares(io: spu_api.Io, compiled: Compiled) -> list[list[Any]]:
    """Public shares of ``compiled``'s hoisted constants, one list of per-rank shares each."""
    return [io.make_shares(c, spu_pb2.Visibility.VIS_PUBLIC) for c in compiled.constants]


class Execution(NamedTuple):
    """One run of a compiled program: flat revealed outputs (None when not revealed), the
    communication cost (None unless profiled) and the wall seconds of the run itself."""

    outputs: list[Any] | None
    cost: CommCost | None
    seconds: float


def execute(
    compiled: Compiled,
    leaves: Sequence[Any],
    visibilities: Sequence[int],
    p: ProtocolPreset,
    *,
    profile: bool = False,
    reveal: bool = True,
) -> Execution:
    """Share, run and (optionally) reveal, once: THE one-shot path under every runner
    (`mpc_run`, `artifacts.run_artifact`, the profiler). ``leaves`` are the program's
    input leaves in order, ``visibilities`` one SPU visibility each; the hoisted constants
    are appended as public inputs here."""
    io = spu_api.Io(p.world_size, runtime_config(p))
    for i, x in enumerate(leaves):
        check_shareable(f"input {i}", x, p)
    shares = [io.make_shares(np.asarray(x), v) for x, v in zip(leaves, visibilities, strict=True)]
    shares += constant_shares(io, compiled)
    cost = None
    start = time.perf_counter()
    if profile:
        with capture_fds() as cap:
            outs = run_executable(compiled.executable, shares, p, profile=True)
        cost = parse_profile_log(cap.text, p.world_size)
    else:
        outs = run_executable(compiled.executable, shares, p)
    seconds = time.perf_counter() - start
    flat = None
    if reveal:
        flat = [io.reconstruct([outs[r][j] for r in range(p.world_size)]) for j in range(len(outs[0]))]  # fmt: skip
    return Execution(flat, cost, seconds)


def mpc_run(
    fn: Callable,
    args: Sequence[Any],
    public: Public | None = None,
    preset: ProtocolPreset | None = None,
    profile: bool = False,
    *,
    name: str | None = None,
) -> MpcResult:
    """Evaluate ``fn(*args)`` under SPU and reveal the result.

    Args:
        fn: a JAX-traceable function of positional array pytrees.
        args: the positional arguments (pytrees of arrays).
        public: which arguments are public -- a collection of indices, or one bool per
            argument. The rest are secret-shared. Default: all secret.
        preset: protocol preset; default ``ProtocolPreset("ABY3")``.
        profile: also measure communication (one run; stdout/stderr are captured at the
            file-descriptor level meanwhile, non-profile lines are passed through after).
    Returns:
        MpcResult(outputs with fn's output structure and numpy leaves, CommCost or None).
    """
    p = preset if preset is not None else ProtocolPreset("ABY3")
    args = _canon(args)
    mask = public_mask(public, len(args))
    compiled = compile_to_pphlo(fn, args, mask, name=name, rewrites=p.rewrites)
    leaves = jax.tree_util.tree_leaves(args)
    run = execute(compiled, leaves, _flat_vis(args, mask), p, profile=profile)
    return MpcResult(jax.tree_util.tree_unflatten(compiled.output_treedef, run.outputs), run.cost)
