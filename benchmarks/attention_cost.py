"""Communication cost of ONE attention head under SPU: softmax vs random feature attention.

    .venv/bin/python benchmarks/attention_cost.py            # n = 128 and 512
    .venv/bin/python benchmarks/attention_cost.py --seq 128  # quicker

Setup (matches the DESIGN.md table): SEMI2K, FM64 (18 fraction bits), batch 1, one head,
head_dim d = 64, q, k, v SECRET [1, n, 1, 64] (Gaussian, then scaled like real MiniLM
activations), key mask all ones, RFA with the l2 variant and m = 64 random directions
(2m = 128 features). Public inputs (random directions, polynomial coefficients) are hoisted
by the simulator and cost nothing. Figures are bytes sent and link send actions (rounds);
`total_bytes` sums over both parties, `rank0_bytes` is the larger party's figure (SEMI2K's
trusted-first-party dealer makes rank 0 the larger sender), comparable with DESIGN.md.

Prints a table and writes benchmarks/results/attention_cost.json. Byte and round counts
are deterministic; wall time on shared machines is not and is not reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from secfwt_jax.compile import protocols, simulator
from secfwt_jax.models.attention import random_feature_attention, softmax_attention
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.feature_maps import cheapest_degree, direction_bound, poly_error_bound

RESULTS = Path(__file__).parent / "results" / "attention_cost.json"
HEAD_DIM = 64
NUM_FEATURES = 64


def cases() -> dict[str, AttentionConfig | None]:
    """Name -> RFA config (None is softmax)."""
    rfa = AttentionConfig(kind="rfa", variant="l2", num_features=NUM_FEATURES)
    return {
        "softmax": None,
        "rfa_exact_trig": rfa,
        "rfa_poly_trig": dataclasses.replace(rfa, trig="poly"),
    }


def head_fn(cfg: AttentionConfig | None, seq: int):
    mask = np.ones((1, seq), np.float32)

    def attention(q, k, v):
        if cfg is None:
            return softmax_attention(q, k, v, mask)
        return random_feature_attention(q, k, v, mask, cfg, layer=0)

    return attention


def qkv(seq: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(0.0, 1.0, (1, seq, 1, HEAD_DIM)).astype(np.float32) for _ in range(3))


def measure(name: str, cfg: AttentionConfig | None, seq: int) -> dict:
    args = qkv(seq)
    fn = head_fn(cfg, seq)
    start = time.perf_counter()
    res = simulator.mpc_execute(
        fn, args, preset=protocols.preset("SEMI2K"), profile=True, name=name
    )
    seconds = time.perf_counter() - start
    plain = np.asarray(fn(*args))
    cost = res.cost
    extra = {}
    if cfg is not None and cfg.trig == "poly":
        bound = direction_bound(cfg.seed, 1, HEAD_DIM, cfg.num_features, cfg.sigma)
        degree = cfg.poly_degree or cheapest_degree(bound)
        extra = {
            "poly_bound_l2": bound,
            "poly_degree": degree,
            "poly_error_bound": poly_error_bound(bound, degree),
        }
    return {
        "case": name,
        "seq": seq,
        "total_bytes": cost.total_bytes,
        "per_party_bytes": cost.per_party_bytes,
        "rank0_bytes": max(cost.per_party_bytes),
        "max_rounds": cost.max_rounds,
        "total_send_actions": cost.total_send_actions,
        "max_abs_err_vs_plaintext": float(np.max(np.abs(np.asarray(res.outputs) - plain))),
        "wall_s_noisy": round(seconds, 1),
        **extra,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| case | n | total MB (both parties) | rank-0 MB | max rounds | max abs err vs plaintext |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['seq']} | {r['total_bytes'] / 1e6:.1f} | "
            f"{r['rank0_bytes'] / 1e6:.1f} | {r['max_rounds']} | "
            f"{r['max_abs_err_vs_plaintext']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--cases", nargs="+", default=list(cases()))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for seq in args.seq:
        for name in args.cases:
            rows.append(measure(name, cases()[name], seq))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {"protocol": "SEMI2K", "field": "FM64", "head_dim": HEAD_DIM,
             "num_features": NUM_FEATURES, "variant": "l2", "inputs": "q, k, v secret N(0,1)"}  # fmt: skip
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
