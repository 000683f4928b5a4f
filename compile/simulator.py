"""The in-process SPU simulator: parties are threads joined by an in-memory link
(``libspu.link.create_mem``), one ``spu.api.Runtime`` per rank. One `SimulatorSession`
puts, runs and reveals; everything that runs a program in this process goes through it:
the backend's persistent session (values stay shares between runs), and the one-shot
`execute` under `mpc_execute`, `artifacts.execute_artifact` and the profiler.

    s = SimulatorSession(protocols.preset("ABY3"))
    s.put("theta", theta)                      # secret-shared
    s.put("z", z, public=True)                 # every party holds the plaintext
    for i in range(steps):
        s.execute(compiled, ["theta", "frozen", "batch", "z", "lr"], ["theta", "info"])
        loss = s.reveal("info")["loss"]        # opt-in, per step
    theta = s.reveal("theta")                  # the tuned result, once

    res = simulator.mpc_execute(f, (x, z), public={1}, preset=protocols.preset("ABY3"),
                            profile=True)      # compile, share, run, reveal once
    res.outputs, res.cost.total_bytes

`run` takes a program compiled by `compiler.compile_to_pphlo` for the same argument
structure; a named value is a pytree and is stored leaf by leaf as ``name/i``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from spu import api as spu_api
from spu import libspu, spu_pb2

from secfwt_jax.files import write_npz_atomic

from .compiler import (
    Compiled,
    Public,
    canonical_args,
    compile_to_pphlo,
    flat_visibilities,
    pphlo_input_types,
    public_mask,
)
from .cost import CommCost, capture_fds, parse_profile_log
from .protocols import ProtocolPreset, check_shareable, runtime_config
from .visibility import is_secret_type


class MpcResult(NamedTuple):
    """outputs: fn's output pytree with numpy leaves. cost: CommCost, or None unless
    profiled."""

    outputs: Any
    cost: CommCost | None


class SimulatorSession:
    """Per-rank SPU runtimes kept alive; see module doc.

    Args:
        preset: protocol preset (world size, ring, fixed point).
        profile: log per-op communication on every run; `run` then returns a CommCost.
    """

    def __init__(self, preset: ProtocolPreset, profile: bool = False):
        self.preset = preset
        self.profile = profile
        self._io = spu_api.Io(preset.world_size, runtime_config(preset))
        desc = libspu.link.Desc()
        for r in range(preset.world_size):
            desc.add_party(f"id_{r}", f"thread_{r}")

        def make_runtime(rank: int) -> spu_api.Runtime:
            cfg = runtime_config(preset, profile=profile and rank == 0)
            cfg.enable_pphlo_profile = profile
            return spu_api.Runtime(libspu.link.create_mem(desc, rank), cfg)

        # Link and runtime set-up talk to the other ranks: build them concurrently.
        self._runtimes: list[spu_api.Runtime] = _parallel(make_runtime, preset.world_size)
        self._trees: dict[str, Any] = {}  # name -> treedef
        self._public: dict[str, bool] = {}
        self._shapes: dict[str, list[tuple[int, ...]]] = {}  # None for run outputs

    # ------------------------------------------------------------------ values
    def put(self, name: str, value: Any, public: bool = False) -> None:
        """Share a pytree under ``name`` (secret by default; ``public`` = plaintext)."""
        raw = jax.tree_util.tree_leaves(value)
        for path, leaf in zip(_leaf_names(name, value), raw, strict=True):
            check_shareable(path, leaf, self.preset)  # before any cast hides the problem
        (value,) = canonical_args([value])
        leaves, treedef = jax.tree_util.tree_flatten(value)
        vis = spu_pb2.Visibility.VIS_PUBLIC if public else spu_pb2.Visibility.VIS_SECRET
        for i, leaf in enumerate(leaves):
            shares = self._io.make_shares(leaf, vis)
            for rank, rt in enumerate(self._runtimes):
                rt.set_var(f"{name}/{i}", shares[rank])
        self._trees[name] = treedef
        self._public[name] = public
        self._shapes[name] = [tuple(leaf.shape) for leaf in leaves]

    def delete(self, name: str) -> None:
        """Forget ``name`` in every rank (its shares are dropped)."""
        treedef = self._tree(name)
        for rt in self._runtimes:
            for i in range(treedef.num_leaves):
                rt.del_var(f"{name}/{i}")
        del self._trees[name], self._public[name]
        self._shapes.pop(name, None)

    def dump_shares(self, name: str, paths: Sequence[str | Path]) -> None:
        """Write each rank's own shares of ``name`` to ``paths[rank]`` (atomically); no
        rank's file holds anything of another rank's, and nothing is reconstructed."""
        treedef = self._tree(name)
        for rank, (rt, path) in enumerate(zip(self._runtimes, paths, strict=True)):
            arrays = {}
            for i in range(treedef.num_leaves):
                share = rt.get_var(f"{name}/{i}")
                arrays[f"meta_{i}"] = np.frombuffer(share.meta, np.uint8)
                for j, chunk in enumerate(share.share_chunks):
                    arrays[f"chunk_{i}_{j}"] = np.frombuffer(chunk, np.uint8)
            arrays["rank"] = np.asarray(rank)
            write_npz_atomic(path, arrays, private=True)

    def load_shares(self, name: str, paths: Sequence[str | Path], like: Any) -> None:
        """Store under ``name`` the shares ``dump_shares`` wrote (a pytree shaped ``like``)."""
        leaves, treedef = jax.tree_util.tree_flatten(like)
        for rank, (rt, path) in enumerate(zip(self._runtimes, paths, strict=True)):
            with np.load(path) as f:
                if int(f["rank"]) != rank or f"meta_{len(leaves) - 1}" not in f.files:
                    raise ValueError(f"{path}: not rank {rank}'s shares of a {len(leaves)}-leaf value")  # fmt: skip
                for i in range(len(leaves)):
                    share = libspu.Share()
                    share.meta = f[f"meta_{i}"].tobytes()
                    count = sum(1 for k in f.files if k.startswith(f"chunk_{i}_"))
                    share.share_chunks = [f[f"chunk_{i}_{j}"].tobytes() for j in range(count)]
                    rt.set_var(f"{name}/{i}", share)
        self._trees[name] = treedef
        self._public[name] = False
        self._shapes[name] = [tuple(np.shape(leaf)) for leaf in leaves]

    def names(self) -> list[str]:
        return sorted(self._trees)

    def reveal(self, name: str) -> Any:
        """Reconstruct the pytree ``name`` (numpy leaves). The ONLY way values leave."""
        treedef = self._tree(name)
        flat = []
        for i in range(treedef.num_leaves):
            shares = [rt.get_var(f"{name}/{i}") for rt in self._runtimes]
            flat.append(self._io.reconstruct(shares))
        return jax.tree_util.tree_unflatten(treedef, flat)

    def _tree(self, name: str):
        if name not in self._trees:
            raise KeyError(f"session has no value {name!r}; have {self.names()}")
        return self._trees[name]

    # ------------------------------------------------------------------ runs
    def execute(
        self,
        compiled: Compiled,
        input_names: Sequence[str],
        output_names: Sequence[str],
        consume: bool = False,
    ) -> CommCost | None:
        """Run ``compiled`` on stored values; store its outputs without revealing them.

        ``input_names`` name the program's positional arguments in order;
        ``output_names`` name the top-level items of its output (a tuple/list output
        gets one name per item, any other output one name). With ``consume`` the inputs
        are deleted as the program takes them (one copy of their shares at a time).
        Returns the run's CommCost when the session profiles, else None.
        """
        exe = compiled.executable
        in_vars = [f"{n}/{i}" for n in input_names for i in range(self._tree(n).num_leaves)]
        const = constant_shares(self._io, compiled)
        if len(in_vars) + len(const) != len(exe.input_names):
            raise ValueError(
                f"input_names: {len(in_vars)} leaves + {len(const)} constants for a program "
                f"with {len(exe.input_names)} inputs"
            )
        self._check_inputs(compiled, input_names)
        out_trees = _split_outputs(compiled.output_treedef, len(output_names))
        out_vars = [f"{n}/{i}" for n, t in zip(output_names, out_trees, strict=False) for i in range(t.num_leaves)]  # fmt: skip

        def party(rank: int):
            rt = self._runtimes[rank]
            for src, dst in zip(in_vars, exe.input_names, strict=False):
                rt.set_var(dst, rt.get_var(src))
                if consume:
                    rt.del_var(src)
            for c, dst in zip(const, exe.input_names[len(in_vars) :], strict=True):
                rt.set_var(dst, c[rank])
            rt.run(exe)
            for src, dst in zip(exe.output_names, out_vars, strict=True):
                rt.set_var(dst, rt.get_var(src))
            for name in list(exe.input_names) + list(exe.output_names):
                rt.del_var(name)

        cost = None
        if self.profile:
            with capture_fds() as cap:
                _parallel(party, self.preset.world_size)
            cost = parse_profile_log(cap.text, self.preset.world_size)
        else:
            _parallel(party, self.preset.world_size)
        if consume:
            for name in dict.fromkeys(n for n in input_names if n not in output_names):
                del self._trees[name], self._public[name]
                self._shapes.pop(name, None)
        for name, tree in zip(output_names, out_trees, strict=True):
            self._trees[name] = tree
            self._public[name] = False
            self._shapes[name] = None
        return cost

    def _check_inputs(self, compiled: Compiled, input_names: Sequence[str]) -> None:
        """Refuse, in one line, a stored value whose shape or visibility is not what the
        program was compiled for (SPU itself answers with a C++ stack, or silently
        computes on a public value where the policy wants a secret)."""
        types = pphlo_input_types(compiled.pphlo_text)
        i = 0
        for name in input_names:
            shapes = self._shapes.get(name)
            for leaf in range(self._tree(name).num_leaves):
                want_secret, want_shape = is_secret_type(types[i]), type_shape(types[i])
                if self._public[name] and want_secret:
                    raise ValueError(f"{name}: put as public, but the program reads input {i} as secret")  # fmt: skip
                if shapes is not None and shapes[leaf] != want_shape:
                    raise ValueError(f"{name}: leaf {leaf} has shape {list(shapes[leaf])}, the program expects {list(want_shape)} at input {i}")  # fmt: skip
                i += 1


def type_shape(pphlo_type: str) -> tuple[int, ...]:
    """The shape of a pphlo tensor type: ``tensor<2x3x!pphlo.secret<f32>>`` -> (2, 3)."""
    inner = pphlo_type[pphlo_type.index("<") + 1 :]
    dims = []
    for part in inner.split("x"):
        if not part.isdigit():
            break
        dims.append(int(part))
    return tuple(dims)


def _leaf_names(name: str, value: Any) -> list[str]:
    paths, _ = jax.tree_util.tree_flatten_with_path(value)
    return [name + "".join(str(k) for k in path) for path, _ in paths]


def _split_outputs(treedef, n: int) -> list:
    """Treedefs of the top-level items of an output tree (one item if n == 1)."""
    if n == 1:
        return [treedef]
    children = treedef.children()
    if len(children) != n:
        raise ValueError(f"output_names: {n} names for an output with {len(children)} items")
    return children


def _parallel(fn, n: int) -> list:
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def target(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


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
    """Share, run and (optionally) reveal, once, in a fresh `SimulatorSession`: the path
    under `mpc_execute`, `artifacts.execute_artifact` and the profiler. ``leaves`` are the
    program's input leaves in order, ``visibilities`` one SPU visibility each; the hoisted
    constants are appended as public inputs by the session. The inputs are consumed by the
    run, so a big program peaks at one copy of its inputs' shares (a Llama-7B layer at 32
    tokens: 15.3 GB resident, against 21.3 GB with two)."""
    session = SimulatorSession(p, profile=profile)
    names = [f"input {i}" for i in range(len(leaves))]
    for name, leaf, vis in zip(names, leaves, visibilities, strict=True):
        session.put(name, np.asarray(leaf), public=vis == spu_pb2.Visibility.VIS_PUBLIC)
    start = time.perf_counter()
    cost = session.execute(compiled, names, ["output"], consume=True)
    seconds = time.perf_counter() - start
    flat = jax.tree_util.tree_leaves(session.reveal("output")) if reveal else None
    return Execution(flat, cost, seconds)


def mpc_execute(
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
    args = canonical_args(args)
    mask = public_mask(public, len(args))
    compiled = compile_to_pphlo(fn, args, mask, name=name, rewrites=p.rewrites)
    leaves = jax.tree_util.tree_leaves(args)
    run = execute(compiled, leaves, flat_visibilities(args, mask), p, profile=profile)
    return MpcResult(jax.tree_util.tree_unflatten(compiled.output_treedef, run.outputs), run.cost)


__all__ = [
    "Execution",
    "MpcResult",
    "SimulatorSession",
    "constant_shares",
    "execute",
    "mpc_execute",
]
