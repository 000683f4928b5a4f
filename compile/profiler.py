"""Cost profiler: communication bytes, rounds and compute time of compiled functions, per
model component and per op, with network-model time estimates.

    prof = profile_function(f, (x, z), public={1}, preset=protocols.preset("ABY3"))
    prof.total_bytes, prof.rounds, prof.compute_s, prof.estimate(network.PRESETS["lan"])

    table = profile_components(classifier, StepShape(batch_size=8, seq_len=12), preset)
    print_table(table)

Figures (see :mod:`secfwt_jax.compile.cost` for what SPU logs):
    total_bytes  -- bytes sent by all parties during one ``Runtime.run``. Deterministic.
    rounds       -- ``total_send_actions / world_size``: the mean link send actions per
                    party. Deterministic for every protocol (ABY3's per-party split and
                    ``max_rounds`` vary run to run; their sum does not). For SEMI2K the
                    two parties send equally often, so this is each party's round count.
    compute_s    -- measured wall time of the in-process SPU run (threads, memory links,
                    profiling on). NOISY on shared machines; an estimate of local compute.
The network model (:mod:`secfwt_jax.compile.network`) uses the per-party mean traffic
``total_bytes / world_size`` and ``rounds``: parties send in parallel over their own links.

Components. SPU's log has no source locations, so each component is compiled and profiled
as its own small function at the model's real shapes and the step's real batching: in the
SPSA step all 2K perturbed forwards run as one ``vmap`` over the population, so every
component that depends on the trainable weights is profiled vmapped over P = 2K with
P-stacked secret weights and secret activations [P, B, N, H]. Frozen embeddings do not
depend on theta and run once (unvmapped), as ``vmap`` leaves them. Per-layer components
are profiled for layer 0 and multiplied by the number of layers; the SPSA update is split
into ``update`` (one layer's trainable weights, per layer) and ``update_rest`` (the head
and any other trainable leaves outside the layer stack), so it scales with the layers too. The whole step is
profiled too; ``residual = whole - sum(parts)`` is reported as measured (it holds what the
parts miss -- residual adds, pooling, the loss difference -- and what XLA fuses across
component boundaries).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax

from secfwt_jax.models.classifier import Classifier

from . import network
from .artifacts import artifact_inputs, preset_from_metadata
from .compiler import Public, canonical_args, compile_to_pphlo, flat_visibilities, public_mask
from .cost import OpCost
from .profile_cases import (  # noqa: F401  (StepShape and the cases are part of this API)
    StepShape,
    backprop_step_case,
    component_cases,
    spsa_step_case,
    spsa_update,
    synthetic_batch,
)
from .protocols import ProtocolPreset
from .simulator import execute

#: Component names in table order; per-layer ones are multiplied by the layer count.
COMPONENTS = (
    "embeddings", "attention", "ffn", "layernorm", "gelu", "head", "loss", "update",
    "update_rest",
)  # fmt: skip
PER_LAYER = {"attention": 1, "ffn": 1, "layernorm": 2, "gelu": 1, "update": 1}


@dataclasses.dataclass(frozen=True)
class FunctionProfile:
    """Cost of one run of one compiled function (see module doc for the units)."""

    name: str
    protocol: str
    world_size: int
    total_bytes: int
    total_send_actions: int
    per_party_bytes: list[int]
    max_rounds: int  # informational: not repeatable under ABY3
    compute_s: float  # measured, noisy
    per_op: dict[str, OpCost]
    #: SPU's "hal" and "mpc" profiles (rank 0's view), as `cost.CommCost.per_section`
    per_section: dict[str, dict[str, OpCost]] = dataclasses.field(default_factory=dict)

    @property
    def rounds(self) -> float:
        """Mean send actions per party (the network model's round count)."""
        return self.total_send_actions / self.world_size

    @property
    def bytes_per_party(self) -> float:
        return self.total_bytes / self.world_size

    def estimate(self, net: network.NetworkModel, with_compute: bool = True) -> float:
        """Seconds under ``net``: compute + per-party bytes / bandwidth + rounds * latency."""
        c = self.compute_s if with_compute else 0.0
        return net.estimate(self.bytes_per_party, self.rounds, c)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "world_size": self.world_size,
            "total_bytes": self.total_bytes,
            "total_send_actions": self.total_send_actions,
            "rounds": self.rounds,
            "per_party_bytes": self.per_party_bytes,
            "max_rounds": self.max_rounds,
            "compute_s_measured_noisy": self.compute_s,
            "per_op": {k: v.to_dict() for k, v in self.per_op.items()},
            "estimates_s": {k: self.estimate(n) for k, n in network.PRESETS.items()},
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def profile_function(
    fn: Callable,
    args: Sequence[Any],
    public: Public | None = None,
    preset: ProtocolPreset | None = None,
    *,
    name: str | None = None,
) -> FunctionProfile:
    """Compile ``fn(*args)`` with the given visibilities, run it once under SPU with
    profiling, and return its cost. Outputs are not reconstructed."""
    p = preset if preset is not None else ProtocolPreset("ABY3")
    args = canonical_args(args)
    mask = public_mask(public, len(args))
    name = name or getattr(fn, "__name__", "program")
    compiled = compile_to_pphlo(fn, args, mask, name=name, rewrites=p.rewrites)
    leaves = jax.tree_util.tree_leaves(args)
    run = execute(compiled, leaves, flat_visibilities(args, mask), p, profile=True, reveal=False)
    cost, wall = run.cost, run.seconds
    return FunctionProfile(
        name, p.name, p.world_size, cost.total_bytes, cost.total_send_actions,
        cost.per_party_bytes, cost.max_rounds, wall, cost.per_op, cost.per_section,
    )  # fmt: skip


def profile_artifact(artifact, args: Sequence[Any], preset: ProtocolPreset | None = None) -> FunctionProfile:  # fmt: skip
    """Run a compiled artifact (`compile.artifacts`) once under SPU with profiling, on
    ``args`` shared with the visibilities its metadata records, and return its cost: the
    very bytecode `secfwt finetune` runs. Bytes and rounds depend on shapes only, not on
    values, so zeros of the right shapes give the cost of every call."""
    p = preset or preset_from_metadata(artifact.metadata)
    leaves, visibilities = artifact_inputs(artifact, args)
    run = execute(artifact.compiled, leaves, visibilities, p, profile=True, reveal=False)
    cost = run.cost
    return FunctionProfile(
        artifact.metadata["name"], p.name, p.world_size, cost.total_bytes,
        cost.total_send_actions, cost.per_party_bytes, cost.max_rounds, run.seconds, cost.per_op,
        cost.per_section,
    )  # fmt: skip


# ----------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class ComponentRow:
    """One component: its profile per instance, and how many instances the step runs."""

    name: str
    count: int
    profile: FunctionProfile

    @property
    def total_bytes(self) -> int:
        return self.count * self.profile.total_bytes

    @property
    def rounds(self) -> float:
        return self.count * self.profile.rounds

    @property
    def compute_s(self) -> float:
        return self.count * self.profile.compute_s


@dataclasses.dataclass(frozen=True)
class ComponentProfile:
    """Per-component table of one step, the whole step, and the residual.

    ``layers`` is the layer count the table reports; when the model was profiled with
    fewer layers (``layers_measured``), the whole step is extrapolated as
    ``whole_measured + (layers - layers_measured) * per-layer parts`` and flagged.
    """

    label: str
    protocol: str
    shape: StepShape
    model: dict
    layers: int
    layers_measured: int
    rows: list[ComponentRow]
    whole: FunctionProfile | None

    @property
    def extrapolated(self) -> bool:
        return self.layers != self.layers_measured

    def parts(self) -> dict[str, float]:
        return {
            "total_bytes": sum(r.total_bytes for r in self.rows),
            "rounds": sum(r.rounds for r in self.rows),
            "compute_s": sum(r.compute_s for r in self.rows),
        }

    def per_layer(self) -> dict[str, float]:
        """Bytes/rounds/compute of one layer's components (attention, FFN, 2 LN, GeLU)."""
        rows = [r for r in self.rows if r.name in PER_LAYER]
        return {
            "total_bytes": sum(r.total_bytes for r in rows) / self.layers,
            "rounds": sum(r.rounds for r in rows) / self.layers,
            "compute_s": sum(r.compute_s for r in rows) / self.layers,
        }

    def whole_totals(self) -> dict[str, float] | None:
        """Whole-step bytes/rounds/compute at ``layers`` (extrapolated if flagged)."""
        if self.whole is None:
            return None
        extra = self.layers - self.layers_measured
        w, one = self.whole, self.per_layer()
        return {
            "total_bytes": w.total_bytes + extra * one["total_bytes"],
            "rounds": w.rounds + extra * one["rounds"],
            "compute_s": w.compute_s + extra * one["compute_s"],
        }

    def residual_by_op(self) -> dict[str, int] | None:
        """pphlo op -> whole-step bytes minus the parts' bytes, at ``layers_measured``
        (where the residual lives; exact, both sides are deterministic)."""
        if self.whole is None:
            return None
        out = {op: c.bytes for op, c in self.whole.per_op.items()}
        for r in self.rows:
            count = PER_LAYER.get(r.name, 0) * self.layers_measured or 1
            for op, c in r.profile.per_op.items():
                out[op] = out.get(op, 0) - count * c.bytes
        return {op: b for op, b in sorted(out.items(), key=lambda kv: -abs(kv[1])) if b}

    def residual(self) -> dict[str, float] | None:
        whole = self.whole_totals()
        if whole is None:
            return None
        parts = self.parts()
        return {k: whole[k] - parts[k] for k in parts}

    def estimates(self, totals: dict[str, float], world_size: int) -> dict[str, float]:
        return {
            k: n.estimate(totals["total_bytes"] / world_size, totals["rounds"], totals["compute_s"])
            for k, n in network.PRESETS.items()
        }  # fmt: skip

    def to_dict(self) -> dict:
        ws = self.rows[0].profile.world_size
        whole = self.whole_totals()
        return {
            "label": self.label,
            "protocol": self.protocol,
            "world_size": ws,
            "shape": dataclasses.asdict(self.shape),
            "population": self.shape.population,
            "model": self.model,
            "layers": self.layers,
            "layers_measured": self.layers_measured,
            "whole_step_extrapolated": self.extrapolated,
            "components": [
                {
                    "name": r.name,
                    "count": r.count,
                    "per_instance": r.profile.to_dict(),
                    "total_bytes": r.total_bytes,
                    "rounds": r.rounds,
                    "compute_s": r.compute_s,
                }
                for r in self.rows
            ],  # fmt: skip
            "sum_of_parts": self.parts(),
            "whole_step": whole,
            "whole_step_measured": None if self.whole is None else self.whole.to_dict(),
            "residual_whole_minus_parts": self.residual(),
            "residual_bytes_by_op_at_layers_measured": self.residual_by_op(),
            "estimates_s": None if whole is None else self.estimates(whole, ws),
            "units": {
                "total_bytes": "bytes sent, all parties (deterministic)",
                "rounds": "total send actions / world_size (deterministic)",
                "compute_s": "measured SPU simulator wall time (noisy)",
                "estimates_s": "compute + (total_bytes/world_size)*8/bw + rounds*latency",
            },
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def model_summary(classifier: Classifier) -> dict:
    c = classifier.config
    return {
        "family": c.family, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_layers": c.num_layers, "num_heads": c.num_heads,
        "intermediate_size": c.intermediate_size, "activation": c.activation,
        "attention": dataclasses.asdict(c.attention), "head": dataclasses.asdict(classifier.head),
    }  # fmt: skip


def profile_components(
    classifier: Classifier,
    shape: StepShape,
    preset: ProtocolPreset | None = None,
    *,
    layers: int | None = None,
    whole_step: bool = True,
    seed: int = 0,
    label: str = "",
) -> ComponentProfile:
    """Profile each component of one SPSA step (see module doc) and the whole step.

    Args:
        classifier: a bert/roberta classifier with a linear head; its attention config
            (softmax or RFA) is what gets profiled.
        shape: batch, sequence, K (population 2K) and the trainable split.
        preset: protocol preset (default ABY3).
        layers: report for this many layers (default: the model's); per-layer parts scale
            exactly, the whole step is extrapolated when it differs from the model's.
        whole_step: also profile the whole step (slow for big models).
    """
    p = preset if preset is not None else ProtocolPreset("ABY3")
    measured = classifier.config.num_layers
    layers = measured if layers is None else layers
    if layers < 1:
        raise ValueError(f"layers: must be >= 1, got {layers!r}")
    params = classifier.init(seed, seq_len=shape.seq_len)
    rows = []
    for name, (fn, args, public) in component_cases(classifier, params, shape, seed).items():
        prof = profile_function(fn, args, public, p, name=f"{label}_{name}")
        rows.append(ComponentRow(name, PER_LAYER.get(name, 0) * layers or 1, prof))
    whole = None
    if whole_step:
        fn, args, public = spsa_step_case(classifier, params, shape, seed)
        whole = profile_function(fn, args, public, p, name=f"{label}_spsa_step")
    return ComponentProfile(
        label or classifier.config.attention.kind, p.name, shape, model_summary(classifier),
        layers, measured, rows, whole,
    )  # fmt: skip


# ----------------------------------------------------------------------------- tables


def _mb(b: float) -> str:
    return f"{b / 1e6:,.2f}"


def print_table(table: ComponentProfile, out: Callable[[str], None] = print) -> None:
    """Per-component table, then the whole step, the residual and network estimates."""
    ws = table.rows[0].profile.world_size
    out(f"== {table.label}: {table.protocol}, B={table.shape.batch_size} "
        f"N={table.shape.seq_len} P={table.shape.population} layers={table.layers}"
        + (f" (whole step extrapolated from {table.layers_measured})" if table.extrapolated
           else ""))  # fmt: skip
    out(f"{'component':<12}{'count':>6}{'MB/inst':>12}{'MB total':>12}{'rounds/inst':>13}"
        f"{'rounds':>10}{'compute s*':>12}")  # fmt: skip
    for r in table.rows:
        out(f"{r.name:<12}{r.count:>6}{_mb(r.profile.total_bytes):>12}{_mb(r.total_bytes):>12}"
            f"{r.profile.rounds:>13,.1f}{r.rounds:>10,.1f}{r.compute_s:>12.2f}")  # fmt: skip
    lines = [("sum of parts", table.parts()), ("whole step", table.whole_totals()),
             ("residual", table.residual())]  # fmt: skip
    for name, t in lines:
        if t is not None:
            out(f"{name:<18}{'':>12}{_mb(t['total_bytes']):>12}{'':>13}{t['rounds']:>10,.1f}"
                f"{t['compute_s']:>12.2f}")  # fmt: skip
    whole = table.whole_totals()
    if whole is not None:
        est = table.estimates(whole, ws)
        out("  est. step time: " + ", ".join(f"{k} {v:,.2f} s" for k, v in est.items()))
    out("  * compute = measured simulator wall time, noisy; bytes and rounds are exact")


def op_table(prof: FunctionProfile, top: int = 12, out: Callable[[str], None] = print) -> None:
    """The ``top`` pphlo ops of ``prof`` by bytes (sums over parties)."""
    ops = sorted(prof.per_op.items(), key=lambda kv: -kv[1].bytes)
    out(f"-- {prof.name}: by op (top {top} of {len(ops)} by bytes)")
    out(f"{'op':<28}{'calls':>8}{'MB':>12}{'% bytes':>9}{'sends/party':>13}")
    for op, c in ops[:top]:
        share = 100.0 * c.bytes / max(prof.total_bytes, 1)
        out(f"{op:<28}{c.calls:>8}{_mb(c.bytes):>12}{share:>9.1f}"
            f"{c.sends / prof.world_size:>13,.1f}")  # fmt: skip
