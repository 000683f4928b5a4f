"""SiLU under MPC: bytes, rounds and error of each `ModelConfig.silu_impl`.

    .venv/bin/python benchmarks/silu_cost.py [--out benchmarks/results/silu_cost.json]

One call on 4,096 secret N(0, 3^2) elements (about the spread of SmolLM2's gate inputs) per
form, ABY3 FM64 in the in-process simulator; bytes are summed over all parties, rounds are
the per-party maximum (`compile/cost.py`). The error is against jax.nn.silu in float64 on
the same inputs, under MPC (fixed point included) and, separately, of the form itself over
the whole real line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from secfwt_jax.compile import protocols, simulator
from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.llama import silu_fn

N = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/silu_cost.json"))
    args = ap.parse_args()
    x = np.random.default_rng(0).normal(0, 3, N).astype(np.float32)
    grid = np.linspace(-40, 40, 160001).astype(np.float32)
    exact = x / (1 + np.exp(-x.astype(np.float64)))
    rows = {}
    for impl in ("exact", "piecewise", "piecewise_lite", "relu"):
        fn = silu_fn(impl)
        res = simulator.mpc_execute(lambda v, fn=fn: fn(v), (x,), preset=protocols.preset("ABY3"), profile=True)  # fmt: skip
        cost = res.cost
        line_err = float(np.max(np.abs(np.asarray(fn(grid)) - np.asarray(jax.nn.silu(grid)))))
        rows[impl] = {
            "bytes_per_element": cost.total_bytes / N,
            "rounds": cost.max_rounds,
            "mpc_max_error": float(np.max(np.abs(np.asarray(res.outputs) - exact))),
            "max_error_over_the_real_line": line_err,
        }
        r = rows[impl]
        print(f"{impl:15s} {r['bytes_per_element']:8.1f} B/elem {r['rounds']:6.1f} rounds  MPC err {r['mpc_max_error']:.2e}  form err {line_err:.2e}")  # fmt: skip
    write_json_atomic(args.out, {"n": N, "protocol": "ABY3 FM64", "rows": rows})


if __name__ == "__main__":
    main()
