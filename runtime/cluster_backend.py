"""The SecretFlow backend: the placement interface of `runtime.backend.Backend` on
SecretFlow devices, one process per party.

An owner's function runs in that owner's process only (a SecretFlow PYU), secrets live in
the SPU device, and a value reaches a party's driver only if that party owns it or it was
published as public metadata. `runtime.cluster_run` opens the session and drives
`runtime.finetune.finetune_on` with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from secfwt_jax.runtime.cluster import ClusterConfig


@dataclasses.dataclass(frozen=True)
class ClusterProgram:
    name: str
    fn: Any
    constants: tuple
    key: str
    cache_hit: bool
    compile_seconds: float
    num_outputs: int
    secret_args: tuple[bool, ...] = ()  # per argument, from the checked artifact


class ClusterBackend:
    """The placement interface of `runtime.sim_backend.SimBackend` on SecretFlow devices
    (`runtime.backend.Backend`).

    The SPU device is opened when first used (`SpuOnDemand`), after every program is
    compiled: its link timeouts are scaled with the programs' largest message
    (`ClusterConfig.spu_link_timeouts`), the same at every party since the programs are.

    Every party compiles each program through `compile.artifacts` as the simulator does
    (through `cache_dir` when given) before SecretFlow compiles it again for its device:
    so the visibility checks (inputs typed as their roles say, nothing secret made public
    inside a program) refuse a program here too, and the key and cache hit are real."""

    kind = "cluster"

    def __init__(self, spu, me: str, preset, cluster: ClusterConfig | None = None, log=None, cache_dir: str | Path | None = None):  # fmt: skip
        self._spu, self.me, self.preset, self.cluster = spu, me, preset, cluster
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.log = log or (lambda m: None)
        self.cost = None  # spu 0.9.3 exposes no link statistics to Python (see README)
        self.largest_message_bytes = 0
        self.timeouts = None

    @property
    def spu(self):
        """The SPU device: opened now if it is a `SpuOnDemand` not yet opened."""
        from secfwt_jax.runtime.cluster import SpuOnDemand

        if not isinstance(self._spu, SpuOnDemand):
            return self._spu
        if self.timeouts is None and self.cluster is not None:
            self.timeouts = self.cluster.spu_link_timeouts(self.largest_message_bytes)
            t = self.timeouts
            self.log(f"SPU links: largest message at most {t.largest_message_bytes / 1e6:,.1f} MB; receive timeout {t.recv_timeout_ms / 1000:,.0f} s, HTTP {t.http_timeout_ms / 1000:,.0f} s (slowest link {t.slowest_link_bps / 1e6:g} Mbps)")  # fmt: skip
        return self._spu.device(self.timeouts.link_desc() if self.timeouts else None)

    def at(self, party: str, fn, *args, num_returns: int = 1):
        import secretflow as sf

        return sf.PYU(party)(fn, num_returns=num_returns)(*args)

    def expect_inputs(self, elements: int) -> None:
        """Before the owners share `elements` elements: SecretFlow's cross-silo timeout
        scaled so that all their shares (sent at once; `protocols.share_bytes` per party)
        cross the slowest link (`ClusterConfig.cross_silo_timeout_ms`)."""
        from secfwt_jax.compile.protocols import share_bytes
        from secfwt_jax.runtime.cluster import set_cross_silo_timeout

        if self.cluster is None:
            return
        burst = share_bytes(self.preset.name, self.preset.field, elements)
        ms = self.cluster.cross_silo_timeout_ms(burst)
        set_cross_silo_timeout(ms)
        self.log(f"SecretFlow links: the owners' shares are at most {burst / 1e6:,.1f} MB per link; cross-silo timeout {ms / 1000:,.0f} s")  # fmt: skip

    def publish(self, obj) -> Any:
        import secretflow as sf

        return sf.reveal(obj)

    def local(self, obj) -> Any:
        """The value of a PYU object in its owner's process; None everywhere else."""
        if obj.device.party != self.me:
            return None
        return obj.data.get_object()

    def share(self, obj):
        """The owner checks its value (range, dtype) in its own process, then shares it."""
        import secretflow as sf

        return sf.PYU(obj.device.party)(_checked_for_spu)(obj, self.preset).to(self.spu)

    def reveal_to(self, party: str, secret):
        import secretflow as sf

        return secret.to(sf.PYU(party))

    def save_shares(self, secret, paths: dict[str, Path]) -> None:
        """Each party's SPU runtime writes its own shares to ``paths[party]`` (atomically,
        in that party's process); SecretFlow ranks are the sorted party names."""
        import functools

        from secfwt_jax.files import atomic_file

        self.spu.dump(secret, [functools.partial(atomic_file, str(paths[p]), private=True) for p in sorted(paths)])  # fmt: skip

    def load_shares(self, paths: dict[str, Path], like: Any):
        """The shares `save_shares` wrote, back into the SPU device (``like`` is implied by
        the files' own metadata)."""
        return self.spu.load([str(paths[p]) for p in sorted(paths)])

    def compile(self, program) -> ClusterProgram:
        import jax

        from secfwt_jax.compile.artifacts import compile_cached, num_outputs, secret_arguments
        from secfwt_jax.compile.compiler import hoist_constants

        # the checks (compile.visibility) raise ValueError("visibility: ...")
        artifact, hit = compile_cached(program, self.preset, self.cache_dir)
        seconds = 0.0 if hit else float(artifact.metadata["compile_seconds"])
        hoisted, constants, out_shape = hoist_constants(
            program.fn, program.args, rewrites=self.preset.rewrites
        )
        out_tree = jax.tree_util.tree_structure(out_shape)

        outputs = num_outputs(program)
        single = outputs == 1

        def spu_fn(*args):
            *inputs, consts = args
            flat = jax.tree_util.tree_leaves(tuple(inputs))
            out = jax.tree_util.tree_unflatten(out_tree, hoisted(*flat, *consts))
            # SecretFlow splits a FROM_USER output by iterating its top level, so a lone
            # dict output would be split into its keys: wrap single outputs in a tuple.
            return (out,) if single else out

        spu_fn.__name__ = program.name
        from secfwt_jax.compile.network import largest_tensor_elements, message_bound_bytes
        from secfwt_jax.compile.protocols import FIELD_BITS

        elements = largest_tensor_elements(program.fn, program.args)
        ring_bytes = FIELD_BITS[self.preset.field] // 8
        self.largest_message_bytes = max(self.largest_message_bytes, message_bound_bytes(elements, ring_bytes))  # fmt: skip
        return ClusterProgram(program.name, spu_fn, constants, artifact.key, hit, seconds, outputs, secret_arguments(artifact))  # fmt: skip

    def execute(self, program: ClusterProgram, *args):
        from secretflow.device import SPUObject
        from secretflow.device.device.spu import SPUCompilerNumReturnsPolicy

        from secfwt_jax.compile.visibility import check_arguments

        check_arguments(program.name, program.secret_args, [isinstance(a, SPUObject) for a in args])  # fmt: skip
        call = self.spu(
            program.fn,
            num_returns_policy=SPUCompilerNumReturnsPolicy.FROM_USER,
            user_specified_num_returns=program.num_outputs,
        )
        out = call(*args, program.constants)
        return tuple(out) if program.num_outputs > 1 else (out,)


def _checked_for_spu(value, preset):
    import jax

    from secfwt_jax.compile.protocols import check_shareable

    paths, _ = jax.tree_util.tree_flatten_with_path(value)
    for path, leaf in paths:
        check_shareable("".join(str(k) for k in path) or "value", leaf, preset)
    return value


__all__ = ["ClusterBackend", "ClusterProgram"]
