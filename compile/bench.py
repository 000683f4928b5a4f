"""``secfwt bench``: MPC cost of tuning steps side by side, at RoBERTa / BERT shapes, with the
issue-9 goals as ratios. A benchmark: it prints and writes figures, it asserts nothing.

    secfwt bench --shapes roberta-base --seqs 128 --protocols ABY3 --out bench/
    python benchmarks/bench.py ...                                   # the same, as a script

Rows. Each row but two is a run spec: the shipped base `configs/bench.yaml` plus the row's
overrides (`row_overrides`: shape, depth, sequence, batch, attention, GeLU, trainable set,
protocol), built by the one builder (`run.build`) into the very program `secfwt finetune`
compiles and runs (the same artifact and cache key), with random weights drawn by the
model owner and K = 1 SPSA direction; bench.json records each row's overrides, so
`secfwt compile configs/bench.yaml --profile --set ...` reproduces it alone. The two
exceptions (`EXCEPTIONS`) are backprop, which no run spec does; they are built by hand in
:mod:`secfwt_jax.compile.profile_cases` on the same model:

    sft_adam           exception: MPC backprop (jax.grad) + Adam, softmax (the paper's SFT)
    bp_prompt          exception: backprop prompt tuning (50 tokens, 500-d subspace), Adam
    spsa_softmax       the run's spsa_step, softmax, every weight but the embeddings trained
    spsa_rfa_exact     the same, RFA (l2, m = 64), exact sin/cos
    spsa_rfa_poly      the same, RFA (l2, m = 64), bounded polynomial sin/cos
    cma_generation     the run's population_loss: one CMA-ES generation (20 public prompt
                       candidates of 50 tokens in a 500-d subspace), RFA poly
    spsa_cached_trunk  the run's spsa_step with a cached trunk (top layer + head), RFA poly
    forward_softmax    the run's predict: one forward and the argmax, softmax
    forward_rfa        the same, RFA poly

``--sets`` (goal b) is run specs too: per trainable set, ``spsa_rfa_poly`` with
``tuning.trainable.kind`` set (`set_overrides`), the run's step against its predict.

Against the hand-built cases these rows replaced (2026-12-06, tiny shape, 8 tokens,
ABY3): the SPSA step +0.3% bytes and +1 round (it takes the labels apart and returns the
loss only), predict +48 rounds (the argmax and one-hot of a run's predictions), the CMA-ES
generation +0.2% bytes and +3 rounds, the cached-trunk step -2 rounds.

SPSA rows use the project's cheap settings: Rademacher directions (free update) and the
piecewise GeLU (the model default); ``--directions gaussian`` measures the product update.
Softmax rows compute exp with ``mpc_ops.exp_nonpositive`` (the run spec's default,
``attention.exp: poly``); ``--softmax-exp exact`` measures SPU's PADE exp instead.

Layers. Each row is measured as a whole program at ``--layers-measured`` layer counts
(default 1 and 2) and extrapolated linearly to the shape's depth: cost(L) = c(1) + (L - 1)
(c(2) - c(1)); every figure is flagged ``extrapolated`` when L was not measured
(tests/test_cost_bench.py holds the extrapolation within 2% of whole 3- and 4-layer runs).

``--by-parts`` (forward rows only) measures two programs instead: the forward without trunk
layers (embedding, final norm, head) and one layer on secret hidden states; a forward of L
layers is rest + L x layer, byte- and round-exact against whole programs (the test holds
it). It is how a shape whose two-layer program does not fit in memory gets a row
(``--shapes llama-7b``: one layer as three parties' shares is about 10 GB).

Figures: bytes sent by all parties and rounds (send actions per party), both exact and
repeatable; LAN / WAN seconds from :mod:`secfwt_jax.compile.network` (per-party bytes /
bandwidth + rounds x latency + the measured, noisy, simulator compute). Goals: P1, a, b,
c, r of issue 9, each with the figures it compares (see docs/cost.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from secfwt_jax.files import check_writable_dir, write_json_atomic, write_text_atomic
from secfwt_jax.models.attention import random_feature_attention, softmax_attention
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import GELU_IMPLS, AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.run.spec import WORLD_SIZE, Architecture, load_spec, trig_schedule_for

from . import network, profile_cases, profiler, protocols

_ENC = dict(family="roberta", vocab_size=50265, max_positions=1026, type_vocab_size=1,
            pad_token_id=1, layer_norm_eps=1e-5, activation="gelu")  # fmt: skip
_BERT = dict(family="bert", vocab_size=30522, max_positions=1024, type_vocab_size=2,
             activation="gelu")  # fmt: skip
SHAPES: dict[str, ModelConfig] = {
    "roberta-base": ModelConfig(
        **_ENC, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),  # fmt: skip
    "roberta-large": ModelConfig(
        **_ENC, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),  # fmt: skip
    "bert-base": ModelConfig(
        **_BERT, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072
    ),  # fmt: skip
    "bert-large": ModelConfig(
        **_BERT, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096
    ),  # fmt: skip
    "minilm": ModelConfig(
        **_BERT, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536
    ),  # fmt: skip
    # Llama family (SwiGLU with the piecewise SiLU, rotary positions, grouped-query heads)
    "smollm2-135m": ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        max_positions=8192,
        activation="silu",
        layer_norm_eps=1e-5,
        rope_theta=1e5,
        silu_impl="piecewise",
    ),  # fmt: skip
    "llama-7b": ModelConfig(
        family="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        intermediate_size=11008,
        max_positions=4096,
        activation="silu",
        layer_norm_eps=1e-6,
        tie_embeddings=False,
        silu_impl="piecewise",
    ),  # fmt: skip
    "tiny": ModelConfig(
        **{**_BERT, "vocab_size": 64},
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        intermediate_size=64,
    ),  # fmt: skip
}
#: Puma (Dong et al. 2023), one 128-token forward on SPU ABY3 FM64, bytes.
PUMA_BYTES = {"bert-base": 10.77e9, "roberta-base": 11.46e9, "bert-large": 27.25e9}
RFA_POLY = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=64)
RFA_EXACT = dataclasses.replace(RFA_POLY, trig="exact")
SOFTMAX = AttentionConfig(exp="poly")
ROWS: dict[str, AttentionConfig] = {
    "sft_adam": SOFTMAX, "bp_prompt": SOFTMAX, "spsa_softmax": SOFTMAX,
    "spsa_rfa_exact": RFA_EXACT, "spsa_rfa_poly": RFA_POLY, "cma_generation": RFA_POLY,
    "spsa_cached_trunk": RFA_POLY, "forward_softmax": SOFTMAX, "forward_rfa": RFA_POLY,
}  # fmt: skip
KEYS = ("total_bytes", "rounds", "compute_s")


#: The base run spec every spec row overrides (`configs/bench.yaml`).
BASE_SPEC = Path(__file__).resolve().parents[1] / "configs" / "bench.yaml"
#: Rows no run spec expresses, measured on a hand-built case, and why.
EXCEPTIONS: dict[str, str] = {
    "sft_adam": "backprop + Adam: no run spec backpropagates (the paper's SFT baseline)",
    "bp_prompt": "backprop prompt tuning: no run spec backpropagates",
}
#: Why a `--by-parts` row is built by hand: no run spec splits a forward into parts.
BY_PARTS_EXCEPTION = ("by parts: the forward without trunk layers and one layer on secret hidden "
                      "states, built by hand (no whole program of the shape fits in memory)")  # fmt: skip
#: Spec rows: the run program each one measures (`run.build.RunPrograms`).
ROW_PROGRAM = {
    "spsa_softmax": "step", "spsa_rfa_exact": "step", "spsa_rfa_poly": "step",
    "spsa_cached_trunk": "step", "cma_generation": "population_loss",
    "forward_softmax": "predict", "forward_rfa": "predict",
}  # fmt: skip


def _flow(value) -> str:
    """A value as an override's YAML (JSON is YAML; tuples as lists)."""
    return json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)


def row_overrides(row: str, cfg: ModelConfig, shape, population: int, protocol: str, trainable: dict | None = None, truncation: str = "exact") -> list[str]:  # fmt: skip
    """The `key=value` overrides that turn `configs/bench.yaml` into ``row``'s run spec:
    the model ``cfg`` (its shape, depth, attention, GeLU/SiLU), the batch and sequence of
    ``shape``, the trainable set and method of the row (``trainable``, if given, replaces
    the row's set), and the protocol (with ``truncation``, when not exact)."""
    arch = {f: getattr(cfg, f) for f in Architecture.model_fields}  # the inline model's fields
    n, b = shape.seq_len, shape.batch_size
    out = [
        f"model.architecture={_flow(arch)}",
        f"model.attention={_flow(cfg.attention)}",
        f"model.gelu={cfg.gelu_impl}",
        f"model.silu={cfg.silu_impl}",
        f"data.max_len={n}",
        f"tuning.batch_size={b}",
        f"evaluation.batch_size={b}",
        f"evaluation.mpc_examples={b}",
        f"tuning.spsa.directions={shape.directions}",
        f"tuning.spsa.num_directions={shape.num_directions}",
        f"protocol.name={protocol}",
        f"parties.compute={_flow(['alice', 'bob', 'carol'][: WORLD_SIZE[protocol]])}",
    ]
    if truncation != "exact":
        out.append(f"protocol.truncation={truncation}")
    if trainable is not None:
        out.append(f"tuning.trainable={_flow(trainable)}")
    elif row == "spsa_cached_trunk":
        out.append("tuning.trainable={kind: top, top_layers: 1, cache_trunk: true}")
    elif row == "cma_generation":
        out += ["tuning.method=cma", f"tuning.cma.population={population}",
                f"tuning.trainable={{kind: prompt, prompt_length: {profile_cases.PROMPT_LENGTH}, "
                f"intrinsic_dim: {profile_cases.INTRINSIC_DIM}}}"]  # fmt: skip
    else:  # every weight but the embeddings, as the bench's steps and forwards always had
        out.append(f"tuning.trainable={{kind: top, top_layers: {cfg.num_layers}}}")
    return out


def spec_row_profile(spec, row: str):
    """Profile the program ``row`` measures, as `secfwt finetune` would build and compile
    it from ``spec`` (`spec_programs.programs_of_run`, the same artifact and cache key)."""
    from .spec_programs import programs_of_run

    return _profile_run_program(spec, getattr(programs_of_run(spec), ROW_PROGRAM[row]))


def _profile_run_program(spec, program):
    """One program of ``spec``'s run, compiled as finetune compiles it, profiled."""
    from .artifacts import compile_cached

    preset = protocols.preset_of(spec)
    artifact, _ = compile_cached(program, preset, None)
    return profiler.profile_artifact(artifact, program.args, preset)


def row_case(row: str, clf: Classifier, params: dict, shape, population: int):
    """(fn, args, public) of an exception row (`EXCEPTIONS`), built by hand."""
    pc = profile_cases
    if row == "sft_adam":
        return pc.backprop_step_case(clf, params, shape, 0, "adam")
    if row == "bp_prompt":
        return pc.prompt_backprop_case(clf, params, shape, 0, "adam")
    raise ValueError(f"row {row!r} is a run spec row: configs/bench.yaml plus row_overrides")


def row_model(row: str, base: ModelConfig, layers: int, rfa_features: int = 64, softmax_exp: str = "poly", rfa_inverse: str = "bucketed", protocol: str = "ABY3") -> ModelConfig:  # fmt: skip
    """``base`` cut to ``layers`` layers with ``row``'s attention (RFA with ``rfa_features``
    and ``rfa_inverse`` and the sin/cos order a run spec picks for ``protocol``, softmax
    with ``softmax_exp``)."""
    attention = ROWS[row]
    if attention.kind == "rfa":
        attention = dataclasses.replace(attention, num_features=rfa_features, inverse=rfa_inverse,
                                        trig_schedule=trig_schedule_for(protocol))  # fmt: skip
    else:
        attention = dataclasses.replace(attention, exp=softmax_exp)
    return dataclasses.replace(base, num_layers=layers, attention=attention)


def measure_row(row, base: ModelConfig, layers: int, shape, preset, population, rfa_features=64, softmax_exp="poly", rfa_inverse="bucketed") -> dict:  # fmt: skip
    """One whole-program profile of ``row`` with the model cut to ``layers`` layers: the
    program its run spec builds, or for an `EXCEPTIONS` row its hand-built case."""
    cfg = row_model(row, base, layers, rfa_features, softmax_exp, rfa_inverse, preset.name)
    if row not in EXCEPTIONS:
        overrides = row_overrides(row, cfg, shape, population, preset.name, truncation=preset.truncation)  # fmt: skip
        spec = load_spec(BASE_SPEC, overrides)
        return {"layers": layers, **_figures(spec_row_profile(spec, row)), "overrides": overrides}  # fmt: skip
    clf = Classifier(cfg, HeadConfig(num_labels=2))
    fn, args, public = row_case(row, clf, clf.init(0, seq_len=shape.seq_len), shape, population)
    prof = profiler.profile_function(fn, args, public, preset, name=f"{row}_{layers}")
    return {"layers": layers, **_figures(prof), "exception": EXCEPTIONS[row]}


def _figures(prof) -> dict:
    """A row's figures from one profile: bytes, rounds, compute and bytes per party."""
    return {"total_bytes": prof.total_bytes, "rounds": prof.rounds,
            "compute_s": prof.compute_s, "per_party_bytes": prof.per_party_bytes}  # fmt: skip


#: Rows a forward by parts can measure (`--by-parts`).
FORWARD_ROWS = ("forward_softmax", "forward_rfa")


def measure_parts(row, base: ModelConfig, shape, preset, rfa_features=64, softmax_exp="poly", rfa_inverse="bucketed") -> dict:  # fmt: skip
    """A forward row by parts, for shapes whose whole program does not fit in memory: the
    forward without trunk layers (embedding, final norm, head) and one trunk layer on
    secret hidden states, each a whole SPU program (`profile_cases.forward_rest_case`,
    `layer_case`). A forward of L layers is rest + L x layer; the same bytes and rounds
    as the whole program (tests/test_cost_bench.py)."""
    if row not in FORWARD_ROWS:
        raise ValueError(f"--by-parts: measures the forward rows {', '.join(FORWARD_ROWS)}, not {row!r}")  # fmt: skip
    cfg = row_model(row, base, 1, rfa_features, softmax_exp, rfa_inverse, preset.name)
    clf = Classifier(cfg, HeadConfig(num_labels=2))
    out = {}
    for part, case in (
        ("rest", profile_cases.forward_rest_case),
        ("layer", profile_cases.layer_case),
    ):
        fn, args, public = case(clf, shape, 0)
        prof = profiler.profile_function(fn, args, public, preset, name=f"{row}_{part}")
        out[part] = _figures(prof)
    return out


def by_parts(parts: dict, layers: int) -> dict:
    """rest + ``layers`` x layer, flagged extrapolated (no whole program was run)."""
    rest, layer = parts["rest"], parts["layer"]
    return {
        **{k: rest[k] + layers * layer[k] for k in KEYS},
        "extrapolated": True,
        "by_parts": True,
        "exception": BY_PARTS_EXCEPTION,
    }


def set_overrides(kind: str, cfg: ModelConfig, shape, protocol: str, truncation: str = "exact") -> list[str]:  # fmt: skip
    """The ``spsa_rfa_poly`` row's run spec with trainable set ``kind`` (the prompt's
    length and subspace as `profile_cases`; the other fields the spec's defaults)."""
    trainable = {"kind": kind, "prompt_length": profile_cases.PROMPT_LENGTH,
                 "intrinsic_dim": profile_cases.INTRINSIC_DIM}  # fmt: skip
    return row_overrides("spsa_rfa_poly", cfg, shape, 0, protocol, trainable, truncation)


def measure_set(kind: str, base: ModelConfig, layers: int, shape, preset, rfa_features=64, rfa_inverse="bucketed") -> dict:  # fmt: skip
    """Goal (b) for one trainable set, through its run spec (`set_overrides`): the run's
    SPSA step and its ``predict`` (one forward of the same problem, plus the argmax), RFA
    poly attention, the model cut to ``layers`` layers."""
    from .spec_programs import programs_of_run

    cfg = row_model("spsa_rfa_poly", base, layers, rfa_features, rfa_inverse=rfa_inverse, protocol=preset.name)  # fmt: skip
    overrides = set_overrides(kind, cfg, shape, preset.name, preset.truncation)
    spec = load_spec(BASE_SPEC, overrides)
    programs = programs_of_run(spec)
    out: dict = {"layers": layers, "overrides": overrides}
    for what, program in (("step", programs.step), ("forward", programs.predict)):
        prof = _profile_run_program(spec, program)
        out[what] = {"total_bytes": prof.total_bytes, "rounds": prof.rounds, "compute_s": prof.compute_s}  # fmt: skip
    return out


def set_ratios(args, preset) -> list[dict]:
    """Goal (b) for every trainable set at the first shape and sequence length."""
    base = dataclasses.replace(SHAPES[args.shapes[0]], gelu_impl=args.gelu)
    shape = profile_cases.StepShape(args.batch, args.seqs[0], directions=args.directions)
    rows = []
    for kind in profile_cases.SET_KINDS:
        pts = [measure_set(kind, base, lay, shape, preset, args.rfa_features, args.rfa_inverse) for lay in args.layers_measured]  # fmt: skip
        step = extrapolate([{"layers": p["layers"], **p["step"]} for p in pts], base.num_layers)
        fwd = extrapolate([{"layers": p["layers"], **p["forward"]} for p in pts], base.num_layers)
        rows.append({"set": kind, "shape": args.shapes[0], "seq": args.seqs[0], "protocol": preset.name,
                     "step": step, "forward": fwd, "measured": pts,
                     "step_over_two_forwards": step["total_bytes"] / (2 * fwd["total_bytes"])})  # fmt: skip
    return rows


def extrapolate(points: list[dict], layers: int) -> dict:
    """Linear in the layer count through the two largest measured points (one point: that
    point, if it has ``layers`` layers). Returns bytes/rounds/compute and the flag.

    Bytes and rounds are exact, so their slopes are too. Compute is measured wall time:
    on a loaded machine the deeper point can take less, and a negative slope would
    extrapolate to a negative time; compute's slope is taken as at least 0."""
    pts = sorted(points, key=lambda p: p["layers"])
    exact = [p for p in pts if p["layers"] == layers]
    if exact:
        return {**{k: exact[0][k] for k in KEYS}, "extrapolated": False}
    if len(pts) < 2:
        raise ValueError("layers_measured: need two layer counts to extrapolate")
    a, b = pts[-2], pts[-1]
    slope = {k: (b[k] - a[k]) / (b["layers"] - a["layers"]) for k in KEYS}
    slope["compute_s"] = max(slope["compute_s"], 0.0)
    return {**{k: b[k] + (layers - b["layers"]) * slope[k] for k in KEYS}, "extrapolated": True}


def estimates(totals: dict, world_size: int) -> dict:
    return {name: net.estimate(totals["total_bytes"] / world_size, totals["rounds"], totals["compute_s"])
            for name, net in network.PRESETS.items()}  # fmt: skip


def head_costs(preset, seqs=(128, 512), d: int = 64, m: int = 64) -> list[dict]:
    """Goal (c): one attention head, RFA (l2, poly, m) against softmax with the project's
    exp ("softmax", `exp_nonpositive`) and with SPU's PADE exp ("softmax_spu_exp", the
    softmax the goal was set against); q/k/v secret [1, n, 1, d]."""
    out, rng = [], np.random.default_rng(0)
    cfg = dataclasses.replace(RFA_POLY, num_features=m)
    for n in seqs:
        q, k, v = (rng.normal(0, 1, (1, n, 1, d)).astype(np.float32) for _ in range(3))
        mask = np.ones((1, n), np.float32)
        fns = {"softmax": lambda a, b, c, mm: softmax_attention(a, b, c, mm, exp="poly"),
               "softmax_spu_exp": lambda a, b, c, mm: softmax_attention(a, b, c, mm),
               "rfa_poly": lambda a, b, c, mm: random_feature_attention(a, b, c, mm, cfg, 0)}  # fmt: skip
        row = {"seq": n, "d": d, "m": m}
        for name, fn in fns.items():
            prof = profiler.profile_function(fn, (q, k, v, mask), (), preset, name=f"head_{name}")
            row[name] = {"total_bytes": prof.total_bytes, "rounds": prof.rounds}
        rfa_bytes = row["rfa_poly"]["total_bytes"]
        row["bytes_ratio"] = row["softmax"]["total_bytes"] / rfa_bytes
        row["bytes_ratio_spu_exp"] = row["softmax_spu_exp"]["total_bytes"] / rfa_bytes
        out.append(row)
    return out


def goals(results: list[dict], heads: list[dict], set_rows: list[dict] = ()) -> dict:
    """Issue 9's goals from whatever rows ran (missing inputs: the goal is skipped)."""
    at = {(r["shape"], r["seq"], r["protocol"], r["row"]): r for r in results}
    g: dict = {}
    for s, puma in PUMA_BYTES.items():
        for row, bound in (("forward_rfa", puma / 3), ("forward_softmax", puma)):
            r = at.get((s, 128, "ABY3", row))
            if r and r["batch"] == 1:
                g[f"P1 {s} {row}"] = {"bytes": r["total_bytes"], "puma": puma,
                                      "ratio_to_puma": r["total_bytes"] / puma,
                                      "target_bytes": bound, "met": r["total_bytes"] <= bound}  # fmt: skip
    for proto in ("ABY3", "SEMI2K"):
        sft = at.get(("roberta-large", 128, proto, "sft_adam"))
        ours = at.get(("roberta-large", 128, proto, "spsa_rfa_poly"))
        if sft and ours:
            rb = sft["total_bytes"] / ours["total_bytes"]
            rt = sft["estimates_s"]["lan"] / ours["estimates_s"]["lan"]
            g[f"a {proto}"] = {"bytes_ratio": rb, "lan_time_ratio": rt, "met": rb >= 25 and rt >= 15}  # fmt: skip
    for (s, n, proto, row), r in at.items():
        fwd = at.get((s, n, proto, {"spsa_softmax": "forward_softmax"}.get(row, "forward_rfa")))
        if row.startswith("spsa_") and row not in ("spsa_rfa_exact", "spsa_cached_trunk") and fwd:
            ratio = r["total_bytes"] / (2 * fwd["total_bytes"])
            g[f"b {s} {n} {proto} {row}"] = {"step_over_two_forwards": ratio, "met": ratio <= 1.05}
    for r in set_rows:
        g[f"b set {r['set']} {r['shape']} {r['seq']} {r['protocol']}"] = {
            "step_over_two_forwards": r["step_over_two_forwards"],
            "met": r["step_over_two_forwards"] <= 1.05,
        }
    for h in heads:
        need = 8 if h["seq"] >= 512 else 2
        for suffix, ref, key in (("", "softmax", "bytes_ratio"),
                                 (" vs SPU exp", "softmax_spu_exp", "bytes_ratio_spu_exp")):  # fmt: skip
            ratio = h[key]
            more_rounds = h["rfa_poly"]["rounds"] > h[ref]["rounds"]
            g[f"c n={h['seq']}{suffix}"] = {"bytes_ratio": ratio, "target": need,
                                            "met": ratio >= need and not more_rounds}  # fmt: skip
    for r in results:
        if r["shape"] == "minilm" and r["row"] == "spsa_rfa_poly" and r["seq"] == 16:
            g[f"r {r['protocol']}"] = {"rounds": r["rounds"], "target": 1500, "met": r["rounds"] <= 1500}  # fmt: skip
    return g


def markdown(results: list[dict], heads: list[dict], gl: dict, set_rows: list[dict] = ()) -> str:
    lines = ["| shape | n | B | protocol | row | GeLU | attention | GB | rounds | LAN s | WAN100 s | extrapolated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        e = r["estimates_s"]
        if ROWS[r["row"]].kind == "rfa":
            attention = f"RFA m {r.get('rfa_features', 64)}"
        else:
            attention = f"softmax, {r['softmax_exp']} exp"
        row = r["row"] + (" (exception: built by hand)" if r.get("exception") else "")
        protocol = r["protocol"] + (", probabilistic truncation" if r.get("truncation") == "probabilistic" else "")  # fmt: skip
        lines.append(f"| {r['shape']} | {r['seq']} | {r['batch']} | {protocol} | {row} | "
                     f"{r.get('gelu', 'piecewise')} | {attention} | "
                     f"{r['total_bytes'] / 1e9:,.2f} | {r['rounds']:,.0f} | {e['lan']:,.1f} | "
                     f"{e['wan100']:,.1f} | {'by parts' if r.get('by_parts') else 'yes' if r['extrapolated'] else 'no'} |")  # fmt: skip
    if heads:
        lines += ["", "| one head (d 64, m 64) | n | softmax (poly exp) MB, rounds | softmax (SPU exp) MB, rounds | RFA poly MB, rounds | ratio | ratio vs SPU exp |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for h in heads:
            cells = [f"{h[k]['total_bytes'] / 1e6:,.1f}, {h[k]['rounds']:.0f}"
                     for k in ("softmax", "softmax_spu_exp", "rfa_poly")]  # fmt: skip
            lines.append(f"| | {h['seq']} | {' | '.join(cells)} | {h['bytes_ratio']:.2f} | "
                         f"{h['bytes_ratio_spu_exp']:.2f} |")  # fmt: skip
    if set_rows:
        lines += ["", "| trainable set | shape | n | protocol | step GB | forward GB | step / 2 forwards |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in set_rows:
            lines.append(f"| {r['set']} | {r['shape']} | {r['seq']} | {r['protocol']} | "
                         f"{r['step']['total_bytes'] / 1e9:,.3f} | {r['forward']['total_bytes'] / 1e9:,.3f} | "
                         f"{r['step_over_two_forwards']:.3f} |")  # fmt: skip
    if gl:
        lines += ["", "| goal | figures | met |", "|---|---|---|"]
        for name, v in gl.items():
            figs = ", ".join(f"{k} {x:,.3g}" for k, x in v.items() if k != "met")
            lines.append(f"| {name} | {figs} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path | None:
    """Bar chart of GB and LAN seconds per row, one group per (shape, n, protocol)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(r["shape"], r["seq"], r["protocol"]) for r in results})
    rows = [row for row in ROWS if any(r["row"] == row for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4 + 0.2 * len(rows)))
    width = 0.8 / max(len(groups), 1)
    for i, grp in enumerate(groups):
        by = {r["row"]: r for r in results if (r["shape"], r["seq"], r["protocol"]) == grp}
        ys = np.arange(len(rows)) + i * width
        for ax, key in zip(axes, ("total_bytes", "lan"), strict=True):
            vals = [(by[x]["estimates_s"]["lan"] if key == "lan" else by[x][key] / 1e9)
                    if x in by else 0.0 for x in rows]  # fmt: skip
            ax.barh(ys, vals, width, label=f"{grp[0]} n={grp[1]} {grp[2]}")
    for ax, title in zip(axes, ("GB, all parties", "LAN s (3 Gbps, 0.8 ms)"), strict=True):
        ax.set_yticks(np.arange(len(rows)) + 0.4 - width / 2, rows)
        ax.set_xscale("log")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def protocol_preset(name: str, truncation: str = "exact"):
    """The preset of protocol ``name``; SEMI2K with ``truncation``, the others exact."""
    return protocols.preset(name, truncation=truncation if name.upper() == "SEMI2K" else "exact")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``secfwt bench`` (see the module doc)."""
    parser.add_argument("--shapes", nargs="+", default=["roberta-base", "roberta-large"], choices=list(SHAPES))  # fmt: skip
    parser.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--protocols", nargs="+", default=["ABY3", "SEMI2K"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--layers-measured", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--by-parts", action="store_true",
                        help="forward rows only: measure the forward without layers and one layer, "
                             "and report rest + L x layer (for shapes too big for a whole program)")  # fmt: skip
    parser.add_argument("--population", type=int, default=20, help="CMA-ES population")
    parser.add_argument("--directions", choices=["rademacher", "gaussian"], default="rademacher")
    parser.add_argument("--gelu", choices=list(GELU_IMPLS), default="piecewise",
                        help="GeLU of every row (ModelConfig.gelu_impl); relu/quad need an adapted model")  # fmt: skip
    parser.add_argument("--rfa-features", type=int, default=64, help="m of the RFA rows")
    parser.add_argument("--softmax-exp", choices=["poly", "exact"], default="poly",
                        help="exp of the softmax rows (AttentionConfig.exp): poly = exp_nonpositive, exact = SPU's PADE exp")  # fmt: skip
    parser.add_argument("--rfa-inverse", choices=["bucketed", "spu"], default="bucketed",
                        help="RFA's rsqrt/reciprocal (AttentionConfig.inverse): bucketed = fewer rounds, spu = fewer bytes")  # fmt: skip
    parser.add_argument("--truncation", choices=["exact", "probabilistic"], default="exact",
                        help="SEMI2K rows' truncation (protocol.truncation); the other protocols are always exact")  # fmt: skip
    parser.add_argument("--heads", action="store_true", help="also goal (c): one head, n 128/512")
    parser.add_argument("--sets", action="store_true",
                        help="also goal (b) for every trainable set, at the first shape and n")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench"))


def command(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Measure, extrapolate, print; write bench.json, bench.md and bench.png under --out."""
    check_writable_dir(args.out, "--out")  # before minutes of measuring
    args.out.mkdir(parents=True, exist_ok=True)
    if args.by_parts and set(args.rows) - set(FORWARD_ROWS):
        raise ValueError(f"--by-parts: measures the forward rows {', '.join(FORWARD_ROWS)} only; "
                         f"--rows has {', '.join(sorted(set(args.rows) - set(FORWARD_ROWS)))}")  # fmt: skip
    start, results = time.perf_counter(), []
    for proto in args.protocols:
        preset = protocol_preset(proto, args.truncation)
        for name in args.shapes:
            base = dataclasses.replace(SHAPES[name], gelu_impl=args.gelu)
            for n in args.seqs:
                shape = profile_cases.StepShape(args.batch, n, directions=args.directions)
                for row in args.rows:
                    if args.by_parts:
                        pts = measure_parts(row, base, shape, preset, args.rfa_features,
                                            args.softmax_exp, args.rfa_inverse)  # fmt: skip
                        tot = by_parts(pts, base.num_layers)
                    else:
                        pts = [measure_row(row, base, lay, shape, preset, args.population,
                                           args.rfa_features, args.softmax_exp, args.rfa_inverse)
                               for lay in args.layers_measured]  # fmt: skip
                        tot = extrapolate(pts, base.num_layers)
                    res = {"shape": name, "layers": base.num_layers, "seq": n, "batch": args.batch,
                           "protocol": proto, "row": row, "gelu": args.gelu,
                           "rfa_features": args.rfa_features, "softmax_exp": args.softmax_exp,
                           "rfa_inverse": args.rfa_inverse, "truncation": preset.truncation,
                           "exception": EXCEPTIONS.get(row), **tot, "measured": pts,
                           "estimates_s": estimates(tot, preset.world_size)}  # fmt: skip
                    results.append(res)
                    # every row on disk as soon as it is measured: a crash (or the OOM
                    # killer, at Llama-7B's shapes) loses only the row it was on
                    write_json_atomic(args.out / "bench.json", {"results": results, "partial": True}, indent=1)  # fmt: skip
                    log(f"{name} n={n} {proto} {row}: {tot['total_bytes'] / 1e9:,.3f} GB, "
                        f"{tot['rounds']:,.0f} rounds, LAN {res['estimates_s']['lan']:,.1f} s")  # fmt: skip
    heads = []
    if args.heads:
        heads = head_costs(protocol_preset(args.protocols[0], args.truncation))
    set_rows = (
        set_ratios(args, protocol_preset(args.protocols[0], args.truncation)) if args.sets else []
    )
    for r in set_rows:
        log(f"set {r['set']}: step / two forwards = {r['step_over_two_forwards']:.3f}")
    gl = goals(results, heads, set_rows)
    table = markdown(results, heads, gl, set_rows)
    log(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"results": results, "heads": heads, "sets": set_rows, "goals": gl, "args": {k: str(v) for k, v in vars(args).items()},
               "networks": {k: n.to_dict() for k, n in network.PRESETS.items()},
               "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    write_json_atomic(args.out / "bench.json", payload, indent=1)
    write_text_atomic(args.out / "bench.md", table + "\n")
    png = plot(results, args.out / "bench.png") if results else None
    log(f"wrote {args.out}/bench.json, bench.md" + (", bench.png" if png else "") +
        f" ({payload['seconds']:.0f} s)")  # fmt: skip
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return command(parser.parse_args(argv))


__all__ = [
    "add_arguments",
    "by_parts",
    "extrapolate",
    "measure_parts",
    "goals",
    "main",
    "command",
    "SHAPES",
    "ROWS",
]

if __name__ == "__main__":
    raise SystemExit(main())
