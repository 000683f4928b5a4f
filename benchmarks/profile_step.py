"""Per-component MPC cost of one tuning step: softmax vs RFA, SPSA vs backprop, LAN/WAN.

A study on hand-built steps, for the per-component tables and the backprop rows. The whole
step a run compiles is measured through its run spec by ``secfwt bench --shapes minilm
--seqs 16 --batch 2 --rows spsa_softmax spsa_rfa_poly --layers-measured 6`` (the README's
figure; 1 round and 1.08 MB above this script's step, docs/results.md says why).

    .venv/bin/python benchmarks/profile_step.py                  # demo + MiniLM-shaped
    .venv/bin/python benchmarks/profile_step.py --models demo    # seconds

Models:
  demo    runtime/demo.py's tiny BERT (2 layers, hidden 32), batch 8, seq 12.
  minilm  all-MiniLM-L6-v2's shape (vocab 30522, 6 layers, hidden 384, 12 heads,
          intermediate 1536, exact-erf GeLU), batch 2, seq 16. To finish in minutes, the
          model is built with ``--minilm-layers`` (default 1) layers: per-layer components
          are exact and multiplied by 6; the whole SPSA step is extrapolated with the
          per-layer parts; the backprop steps are measured at 1 and 2 layers and
          extrapolated linearly. Extrapolated figures are flagged in the JSON.

Step: the demo's SPSA step (K = 1 direction, population P = 2, everything but the
embeddings trainable, weights/data/labels secret, z and the step size public), with
Rademacher directions by default (``--directions gaussian`` for the product update).
GeLU: the models' default piecewise form (`ModelConfig.gelu_impl`). Baseline:
``tuning.backprop.backprop_step`` (jax.grad) on the same trainable set and loss, with SGD
and with Adam (optimiser state created in the step), softmax attention -- the paper's SFT.
RFA: l2 variant, bounded polynomial sin/cos. Softmax: exp by `mpc_ops.exp_nonpositive`
(``attention.exp: poly``, the run spec's default; docs/cost.md section 7).

Figures: bytes sent by all parties, rounds = total send actions / parties (both exact and
repeatable), compute = the simulator's wall time (noisy). Time estimates use
``compile/network.py``: compute + (bytes / parties) * 8 / bandwidth + rounds * latency.
Prints tables; writes benchmarks/results/profile_step.json atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from secfwt_jax.compile import network, profiler, protocols
from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig

RESULTS = Path(__file__).parent / "results" / "profile_step.json"

DEMO = ModelConfig(  # = runtime.demo.DEMO_MODEL (runtime/ is not imported here)
    family="bert", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
    intermediate_size=64, max_positions=32, type_vocab_size=2, activation="gelu_new",
)  # fmt: skip
MINILM = ModelConfig(
    family="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
    intermediate_size=1536, max_positions=512, type_vocab_size=2, activation="gelu",
)  # fmt: skip
RFA = {
    "demo": AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32),
    "minilm": AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32),
}
SOFTMAX = AttentionConfig(exp="poly")
SHAPES = {"demo": profiler.StepShape(8, 12), "minilm": profiler.StepShape(2, 16)}


def backprop_totals(clf: Classifier, shape, preset, optimizer: str, layers: int, log) -> dict:
    """Backprop step at the model's layer count; extrapolated linearly from the model's
    ``num_layers`` and ``num_layers + 1`` when ``layers`` differs."""
    measured = clf.config.num_layers
    counts = [measured] if layers == measured else [measured, measured + 1]
    profs = []
    for n in counts:
        c = Classifier(dataclasses.replace(clf.config, num_layers=n), clf.head)
        fn, args, public = profiler.backprop_step_case(c, c.init(0, shape.seq_len), shape, 0,
                                                       optimizer)  # fmt: skip
        profs.append(profiler.profile_function(fn, args, public, preset, name=f"bp_{optimizer}"))
        log(f"  backprop {optimizer} at {n} layers: {profs[-1].total_bytes / 1e6:,.1f} MB")
    a = profs[0]
    keys = {"total_bytes": "total_bytes", "rounds": "rounds", "compute_s": "compute_s"}
    out = {k: getattr(a, f) for k, f in keys.items()}
    if len(profs) == 2:
        b = profs[1]
        for k, f in keys.items():
            out[k] += (layers - measured) * (getattr(b, f) - getattr(a, f))
    out["layers_measured"] = counts
    out["extrapolated"] = len(profs) == 2
    out["measured"] = [p.to_dict() for p in profs]
    return out


def comparison_rows(tables: dict, backprops: dict, world_size: int) -> list[dict]:
    rows = [{"method": "backprop (SFT), " + o, "attention": "softmax", **t}
            for o, t in backprops.items()]  # fmt: skip
    for kind, tab in tables.items():
        rows.append({"method": "SPSA forward-only", "attention": kind, **tab.whole_totals()})
    ref = rows[0]["total_bytes"] if rows else 1
    for r in rows:
        r["estimates_s"] = {
            k: n.estimate(r["total_bytes"] / world_size, r["rounds"], r["compute_s"])
            for k, n in network.PRESETS.items()
        }
        r["bytes_vs_first_row"] = r["total_bytes"] / ref
    return rows


def print_comparison(name: str, rows: list[dict], log) -> None:
    log(f"== {name}: step comparison (bytes all parties; est. time incl. measured compute)")
    log(f"{'method':<26}{'attn':>8}{'MB':>11}{'x':>7}{'rounds':>9}{'compute s*':>11}"
        + "".join(f"{k + ' s':>11}" for k in network.PRESETS))  # fmt: skip
    for r in rows:
        log(f"{r['method']:<26}{r['attention']:>8}{r['total_bytes'] / 1e6:>11,.1f}"
            f"{r['bytes_vs_first_row']:>7.2f}{r['rounds']:>9,.0f}{r['compute_s']:>11.1f}"
            + "".join(f"{v:>11,.1f}" for v in r["estimates_s"].values()))  # fmt: skip


def profile_model(name: str, base: ModelConfig, layers: int, preset, args, log) -> dict:
    shape = dataclasses.replace(SHAPES[name], directions=args.directions)
    if name == "minilm":
        shape = dataclasses.replace(shape, batch_size=args.batch, seq_len=args.seq)
        base = dataclasses.replace(base, num_layers=args.minilm_layers)
    tables = {}
    for kind, att in (("softmax", SOFTMAX), ("rfa", RFA[name])):
        clf = Classifier(base.with_attention(att), HeadConfig(num_labels=2))
        tables[kind] = profiler.profile_components(clf, shape, preset, layers=layers,
                                                   label=f"{name}_{kind}")  # fmt: skip
        profiler.print_table(tables[kind], log)
    profiler.op_table(tables["rfa"].whole, out=log)
    softmax_clf = Classifier(base.with_attention(SOFTMAX), HeadConfig(num_labels=2))
    backprops = {
        o: backprop_totals(softmax_clf, shape, preset, o, layers, log) for o in args.optimizers
    }
    rows = comparison_rows(tables, backprops, preset.world_size)
    print_comparison(name, rows, log)
    return {
        "tables": {k: t.to_dict() for k, t in tables.items()},
        "backprop": backprops,
        "comparison": rows,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "minilm"], choices=["demo", "minilm"])
    ap.add_argument("--protocol", default="ABY3")
    ap.add_argument("--minilm-layers", type=int, default=1, help="layers actually built")
    ap.add_argument("--seq", type=int, default=16, help="MiniLM sequence length")
    ap.add_argument("--batch", type=int, default=2, help="MiniLM batch size")
    ap.add_argument("--optimizers", nargs="*", default=["sgd", "adam"])
    ap.add_argument("--directions", choices=["rademacher", "gaussian"], default="rademacher",
                    help="SPSA direction distribution (rademacher: free update)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    preset = protocols.preset(args.protocol)
    log = print
    start = time.perf_counter()
    result = {
        "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
        "preset": preset.to_dict(),
        "networks": {k: n.to_dict() for k, n in network.PRESETS.items()},
        "models": {},
    }  # fmt: skip
    for name in args.models:
        base = {"demo": DEMO, "minilm": MINILM}[name]
        result["models"][name] = profile_model(name, base, base.num_layers, preset, args, log)
    result["seconds"] = time.perf_counter() - start
    write_json_atomic(args.out, result, indent=1)
    log(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
