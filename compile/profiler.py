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
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.traverse_util as traverse
import jax
import numpy as np
from spu import api as spu_api

from secfwt_jax.models.classifier import Classifier, cross_entropy
from secfwt_jax.models.encoder import Embeddings, LayerNorm, SelfAttention, activation_fn
from secfwt_jax.models.heads import dense
from secfwt_jax.tuning import backprop, spsa, trainable

from . import network
from .cost import OpCost, capture_fds, parse_profile_log
from .protocols import ProtocolPreset, runtime_config
from .simulator import Public, _canon, _flat_vis, compile_to_pphlo, constant_shares, public_mask
from .simulator import run_executable as _run

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
    args = _canon(args)
    mask = public_mask(public, len(args))
    name = name or getattr(fn, "__name__", "program")
    compiled = compile_to_pphlo(fn, args, mask, name=name, rewrites=p.rewrites)
    io = spu_api.Io(p.world_size, runtime_config(p))
    leaves = jax.tree_util.tree_leaves(args)
    vis = _flat_vis(args, mask)
    shares = [io.make_shares(x, v) for x, v in zip(leaves, vis, strict=True)]
    shares += constant_shares(io, compiled)
    with capture_fds() as cap:
        start = time.perf_counter()
        _run(compiled.executable, shares, p, profile=True)
        wall = time.perf_counter() - start
    cost = parse_profile_log(cap.text, p.world_size)
    return FunctionProfile(
        name, p.name, p.world_size, cost.total_bytes, cost.total_send_actions,
        cost.per_party_bytes, cost.max_rounds, wall, cost.per_op,
    )  # fmt: skip


# ----------------------------------------------------------------------- components


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The step being profiled: batch [B, N], K directions (population P = 2K), and
    whether the word/position embeddings are trainable (the demo freezes them)."""

    batch_size: int
    seq_len: int
    num_directions: int = 1
    embeddings_trainable: bool = False
    eps: float = 1e-2
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        for f in ("batch_size", "seq_len", "num_directions"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f}: must be a positive int, got {getattr(self, f)!r}")

    @property
    def population(self) -> int:
        return 2 * self.num_directions


def _stack(tree, p: int):
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (p, *np.shape(x))).copy(), tree)


def _normal(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def synthetic_batch(classifier: Classifier, shape: StepShape, seed: int = 0) -> dict:
    """One-hot ids [B, N, V], a right-padded mask [B, N] and one-hot labels [B, C]."""
    cfg, rng = classifier.config, np.random.default_rng([seed, 3])
    b, n = shape.batch_size, shape.seq_len
    ids = rng.integers(1, cfg.vocab_size, (b, n))
    mask = (np.arange(n)[None] < rng.integers(n // 2 + 1, n + 1, b)[:, None]).astype(np.float32)
    labels = rng.integers(0, classifier.head.num_labels, b)
    return {
        "input_ids": np.eye(cfg.vocab_size, dtype=np.float32)[ids] * mask[..., None],
        "attention_mask": mask,
        "labels": np.eye(classifier.head.num_labels, dtype=np.float32)[labels],
    }


def is_trainable(shape: StepShape) -> Callable[[str], bool]:
    return lambda path: shape.embeddings_trainable or "embeddings" not in path


def make_loss(classifier: Classifier):
    def loss_fn(t, f, batch):
        return cross_entropy(classifier.logits(trainable.merge(t, f), batch), batch["labels"])

    return loss_fn


def spsa_update(theta, z, loss_pm, step_size, eps: float, weight_decay: float = 0.0):
    """The SPSA step's non-forward part, by the same functions as ``tuning.spsa.spsa_step``:
    the population theta +- eps z and the update. loss_pm: [2K] secret; step_size public."""
    k = jax.tree_util.tree_leaves(z)[0].shape[0]
    config = spsa.SpsaConfig(eps=eps, weight_decay=weight_decay)
    pair = spsa.perturbed_pair(theta, z, eps)
    new, _ = spsa.spsa_update(theta, z, loss_pm[:k], loss_pm[k:], step_size, config)
    return pair, new


def _split_layer0(theta: dict) -> tuple[dict, dict]:
    """(trainable leaves of encoder layer 0, trainable leaves outside the layer stack)."""
    flat = traverse.flatten_dict(theta, sep="/")
    layer0 = {k: v for k, v in flat.items() if "/encoder/layer/0/" in k}
    rest = {k: v for k, v in flat.items() if "/encoder/layer/" not in k}
    return traverse.unflatten_dict(layer0, sep="/"), traverse.unflatten_dict(rest, sep="/")


def _update_case(theta: dict, shape: StepShape, seed: int, rng):
    z = spsa.directions(seed, 0, theta, shape.num_directions)
    fn = lambda t, zz, lpm, lr: spsa_update(t, zz, lpm, lr, shape.eps)  # noqa: E731
    return (
        fn,
        (theta, z, _normal(rng, (shape.population,)), np.float32(shape.learning_rate)),
        (1, 3),
    )


def _component_cases(classifier: Classifier, params: dict, shape: StepShape, seed: int):
    """name -> (fn, args, public indices). See module doc for the batching."""
    cfg, head = classifier.config, classifier.head
    if cfg.family not in ("bert", "roberta") or head.kind != "linear":
        raise ValueError("classifier: the component profiler supports bert/roberta + linear head")
    rng = np.random.default_rng([seed, 5])
    p, b, n, h = shape.population, shape.batch_size, shape.seq_len, cfg.hidden_size
    trunk = params[classifier.trunk_name]
    layer = trunk["encoder"]["layer"]["0"]
    batch = synthetic_batch(classifier, shape, seed)
    mask = batch["attention_mask"]
    x = _normal(rng, (p, b, n, h))
    vm = lambda f: jax.vmap(f, in_axes=(0, 0, None))  # noqa: E731 - weights, acts, mask

    def embeddings(pe, ids, m):
        return Embeddings(cfg).apply({"params": pe}, ids, m)[0]

    def attention(pa, xx, m):
        out = SelfAttention(cfg, 0).apply({"params": pa["self"]}, xx, m)
        return dense(out, pa["output"]["dense"])

    def ffn(pf, xx, _m):
        return dense(dense(xx, pf["intermediate"]), pf["output"])

    def layernorm(pl, xx, _m):
        return LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": pl}, xx)

    def gelu(xx):
        return activation_fn(cfg.activation)(xx)

    def head_fn(ph, xx, m):
        return classifier.scores({classifier.head_name: ph}, xx, m, batch)

    def loss(logits, labels):
        return jax.vmap(cross_entropy, in_axes=(0, None))(logits, labels)

    theta_layer, theta_rest = _split_layer0(trainable.partition(params, is_trainable(shape))[0])
    emb_fn = vm(embeddings) if shape.embeddings_trainable else embeddings
    emb_p = _stack(trunk["embeddings"], p) if shape.embeddings_trainable else trunk["embeddings"]
    ffn_p = {"intermediate": layer["intermediate"]["dense"], "output": layer["output"]["dense"]}
    return {
        "embeddings": (emb_fn, (emb_p, batch["input_ids"], mask), ()),
        "attention": (vm(attention), (_stack(layer["attention"], p), x, mask), ()),
        "ffn": (vm(ffn), (_stack(ffn_p, p), x, mask), ()),
        "layernorm": (vm(layernorm), (_stack(layer["output"]["LayerNorm"], p), x, mask), ()),
        "gelu": (gelu, (_normal(rng, (p, b, n, cfg.intermediate_size)),), ()),
        "head": (vm(head_fn), (_stack(params[classifier.head_name], p), x, mask), ()),
        "loss": (loss, (_normal(rng, (p, b, head.num_labels)), batch["labels"]), ()),
        "update": _update_case(theta_layer, shape, seed, rng),
        "update_rest": _update_case(theta_rest, shape, seed, rng),
    }


def spsa_step_case(classifier: Classifier, params: dict, shape: StepShape, seed: int = 0):
    """(fn, args, public) of the whole SPSA step as the demo compiles it."""
    theta, frozen = trainable.partition(params, is_trainable(shape))
    loss_fn = make_loss(classifier)
    config = spsa.SpsaConfig(eps=shape.eps, num_directions=shape.num_directions)

    def spsa_step(t, f, batch, z, lr):
        return spsa.spsa_step(loss_fn, t, f, batch, z, lr, config)

    z = spsa.directions(seed, 0, theta, shape.num_directions)
    args = (theta, frozen, synthetic_batch(classifier, shape, seed), z, np.float32(1e-3))
    return spsa_step, args, (3, 4)


def backprop_step_case(
    classifier: Classifier, params: dict, shape: StepShape, seed: int = 0, optimizer="sgd"
):
    """(fn, args, public) of the backprop (SFT) baseline: jax.grad + optax ``optimizer``
    ("sgd" or "adam"), same trainable set and loss. The optimiser state is created inside
    the step (its cost, e.g. Adam's sqrt and division, is counted; its carry-over is not).
    Everything but the (public) learning rate is secret."""
    theta, frozen = trainable.partition(params, is_trainable(shape))
    optimizer = backprop.make_optimizer(optimizer, shape.learning_rate)
    loss_fn = make_loss(classifier)

    def backprop_step(t, f, batch):
        new, _, info = backprop.backprop_step(loss_fn, optimizer, t, f, batch, optimizer.init(t))
        return new, info

    return backprop_step, (theta, frozen, synthetic_batch(classifier, shape, seed)), ()


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
    for name, (fn, args, public) in _component_cases(classifier, params, shape, seed).items():
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
