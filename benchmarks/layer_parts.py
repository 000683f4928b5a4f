"""Where one BERT-base layer's bytes go under MPC: attention, FFN, LayerNorm, GeLU.

    .venv/bin/python benchmarks/layer_parts.py --seq 128 --protocol SEMI2K \
        [--truncation probabilistic] [--gelu relu] [--attention rfa|softmax] \
        [--rfa-inverse spu] [--out FILE]

Each part is compiled and run on its own at the layer's real shapes
(`compile.profiler.profile_components`: random weights, batch 1, the parts vmapped over a
population of 2 as the SPSA step runs them; every figure here is per forward, i.e. halved).
The four parts sum to within about 1-2% of the per-layer figure of `secfwt bench`'s
forward rows: the population axis changes how the head products are packed (SEMI2K, 128
tokens, RFA, 2026-12-07: 570.4 MB here, 563.5 MB in `bench_peer_semi2k`). Per part: bytes (all parties), rounds, and bytes by SPU HAL op at rank 0
(f_mmul: secret matmuls; f_mul: secret elementwise products; f_less: comparisons), so a
lever can be aimed at what dominates. Bytes and rounds are exact; writes JSON atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from secfwt_jax.compile import profiler, protocols
from secfwt_jax.compile.bench import RFA_POLY, SHAPES, SOFTMAX
from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.run.spec import trig_schedule_for

PARTS = ("attention", "ffn", "layernorm", "gelu")
POPULATION = 2  # profile_components vmaps the parts over P = 2K, K = 1


def bert_base_layer(attention: str, gelu: str, rfa_inverse: str, protocol: str) -> Classifier:
    """One layer of `secfwt bench`'s bert-base shape, with its attention rows' settings."""
    rfa = dataclasses.replace(RFA_POLY, inverse=rfa_inverse, trig_schedule=trig_schedule_for(protocol))  # fmt: skip
    att = rfa if attention == "rfa" else SOFTMAX
    config = dataclasses.replace(SHAPES["bert-base"], num_layers=1, gelu_impl=gelu, attention=att)  # fmt: skip
    return Classifier(config, HeadConfig(kind="linear", num_labels=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--protocol", default="SEMI2K")
    ap.add_argument("--truncation", choices=["exact", "probabilistic"], default="exact")
    ap.add_argument("--gelu", choices=["piecewise", "exact", "relu", "quad"], default="piecewise")
    ap.add_argument("--attention", choices=["rfa", "softmax"], default="rfa")
    ap.add_argument("--rfa-inverse", choices=["bucketed", "spu"], default="bucketed")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:  # one line naming the field: --protocol, or seq_len for --seq
        preset = protocols.preset(args.protocol, truncation=args.truncation)
        shape = profiler.StepShape(1, args.seq)
    except ValueError as error:
        raise SystemExit(f"layer_parts: error: {error}") from None
    layer = bert_base_layer(args.attention, args.gelu, args.rfa_inverse, preset.name)
    table = profiler.profile_components(layer, shape, preset, whole_step=False)
    parts = {}
    for row in table.rows:
        if row.name not in PARTS:
            continue
        prof = row.profile
        hal = {op: c.bytes / POPULATION for op, c in prof.per_section.get("hal", {}).items() if c.bytes}  # fmt: skip
        parts[row.name] = {"count": row.count, "bytes": prof.total_bytes / POPULATION,
                           "rounds": prof.rounds, "hal_bytes_rank0": hal}  # fmt: skip
    total = sum(p["bytes"] * p["count"] for p in parts.values())
    label = f"BERT-base layer, {args.seq} tokens, {preset.name} {args.truncation}, {args.attention}, GeLU {args.gelu}"  # fmt: skip
    print(f"{label}: {total / 1e6:,.1f} MB")
    for name, p in parts.items():
        ops = ", ".join(f"{op} {b / 1e6:,.1f}" for op, b in sorted(p["hal_bytes_rank0"].items(), key=lambda kv: -kv[1]))  # fmt: skip
        print(f"  {name:10s} x{p['count']} {p['bytes'] / 1e6:9,.1f} MB  {p['rounds']:6.1f} rounds  (rank 0 MB: {ops})")  # fmt: skip
    if args.out is not None:
        write_json_atomic(args.out, {"label": label, "args": vars(args) | {"out": str(args.out)},
                                     "layer_bytes": total, "parts": parts,
                                     "date": time.strftime("%Y-%m-%d")}, indent=1)  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
