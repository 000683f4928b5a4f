"""Membership-inference audit of DP-SPSA against the (epsilon, delta) bound on any attack's AUC.

    .venv/bin/python benchmarks/privacy_audit.py --out benchmarks/results/privacy_audit.json

A worst case for memorisation: a linear head over random features (d = 200) with random
labels, so a member can only be told apart by memorisation. Candidates are split at
random into members and non-members (one-run audit); the model is tuned by DP-SPSA
(`tuning.audit.dp_spsa_train`: Poisson sampling, per-example clipping, the data owner's
noise) at each epsilon, and by the same run without noise; the loss-threshold attack's AUC
is set beside `tuning.audit.auc_bound(epsilon, delta)`. Prints a table, writes JSON; it
asserts nothing (tests/test_privacy_audit.py holds one cell of it).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.classifier import cross_entropy_per_example
from secfwt_jax.tuning import audit, privacy
from secfwt_jax.tuning.spsa import SpsaConfig


def linear_loss(t, _f, b):
    return cross_entropy_per_example(b["x"] @ t["w"] + t["b"], b["labels"])


def audit_once(epsilon: float, seed: int, *, rows=100, dim=200, steps=3000, rate=0.5,
               directions=8, step_size=1.0, clip=1.0, delta=1e-5) -> dict:  # fmt: skip
    """One split, one tuned model, one attack: {auc, bound, noise_multiplier, accuracy}."""
    rng = np.random.default_rng([seed, 41])
    x = (4.0 * rng.standard_normal((rows, dim)) / math.sqrt(dim)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, rows)]
    members = rng.permutation(rows) < rows // 2
    theta0 = {"w": np.zeros((dim, 2), np.float32), "b": np.zeros(2, np.float32)}
    config = SpsaConfig(eps=1e-2, num_directions=directions, directions="gaussian")
    private = math.isfinite(epsilon)
    noise = privacy.noise_multiplier_for(epsilon, delta, rate, steps, directions) if private else 0.0  # fmt: skip
    max_rows = privacy.padded_rows(int(members.sum()), rate, steps, delta, epsilon if private else 1.0)  # fmt: skip
    theta = audit.dp_spsa_train(
        linear_loss, theta0, {}, {"x": x[members], "labels": y[members]}, steps=steps,
        rate=rate, max_rows=max_rows, spsa_config=config, clip=clip, noise_multiplier=noise,
        step_size=step_size, seed=seed, private_seed=seed + 1000,
    )  # fmt: skip
    everyone = {"x": x, "labels": y}
    logits = np.asarray(everyone["x"] @ theta["w"] + theta["b"])
    fit = float(np.mean(np.argmax(logits[members], 1) == np.argmax(y[members], 1)))
    return {
        "epsilon": epsilon, "seed": seed, "noise_multiplier": noise,
        "auc": audit.loss_attack_auc(linear_loss, theta, {}, everyone, members),
        "bound": audit.auc_bound(epsilon, delta) if private else 1.0,
        "member_accuracy": fit,
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8, math.inf])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_audit.json"))
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's order warnings
    start, rows = time.perf_counter(), []
    for eps in args.epsilons:
        for seed in args.seeds:
            rows.append(audit_once(eps, seed))
    print(
        "| epsilon | noise multiplier | attack AUC (mean, max over seeds) | bound | members fit |"
    )
    print("|---|---|---|---|---|")
    for eps in args.epsilons:
        r = [x for x in rows if x["epsilon"] == eps]
        aucs = [x["auc"] for x in r]
        print(f"| {eps:g} | {r[0]['noise_multiplier']:.1f} | {np.mean(aucs):.3f}, {max(aucs):.3f} | "
              f"{r[0]['bound']:.3f} | {np.mean([x['member_accuracy'] for x in r]):.2f} |")  # fmt: skip
    payload = {"rows": rows, "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["benchmarks/privacy_audit.py", *(sys.argv[1:] if argv is None else argv)])}  # fmt: skip
    write_json_atomic(args.out, payload, indent=1)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
