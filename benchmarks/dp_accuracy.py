"""The utility price of differential privacy: test accuracy and a membership audit against
epsilon, for DP-SPSA and DP-SGD on the main run's model and trainable set.

    .venv/bin/python benchmarks/dp_accuracy.py      # ~8 min on 2 cores, CPU

Plaintext, with the step functions a private run compiles (`run.privacy_study`): the real
all-MiniLM-L6-v2 of configs/minilm_sentiment.yaml, its frozen trunk run once over 7,000
rows of the bundled corpus (4,000 training rows, 1,000 holdout non-members for the audit,
1,000 test, 1,000 validation), a fresh linear head per seed, Poisson batches of 64
expected rows, 1,000 steps, delta = 1 / n^1.1. Prints a table, writes JSON and a plot;
asserts nothing (tests/test_privacy_study.py and the notebook hold the pieces).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
import warnings
from pathlib import Path

from secfwt_jax.files import write_json_atomic
from secfwt_jax.run import privacy_study
from secfwt_jax.run.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "configs" / "minilm_sentiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override")  # fmt: skip
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1, 2, 4, 8, math.inf])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=list(privacy_study.METHODS), choices=privacy_study.METHODS)  # fmt: skip
    parser.add_argument(
        "--clip-spsa", type=float, default=1.0, help="clip on each projected gradient"
    )
    parser.add_argument(
        "--clip-sgd", type=float, default=1.0, help="clip on each gradient's L2 norm"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dp_accuracy.json")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "dp_accuracy.png")
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's order warnings
    warnings.filterwarnings("ignore", message="encode: truncated")
    config = privacy_study.StudyConfig(
        train_rows=args.train_rows, epsilons=tuple(args.epsilons), seeds=tuple(args.seeds),
        steps=args.steps, methods=tuple(args.methods), clip_spsa=args.clip_spsa,
        clip_sgd=args.clip_sgd,
    )  # fmt: skip
    start = time.perf_counter()
    study = privacy_study.run_study(load_spec(args.spec, args.overrides), config)
    summary = privacy_study.summarise(study["rows"])
    print(privacy_study.markdown_table(summary))
    privacy_study.plot(summary, args.plot)
    payload = {
        "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
        "command": " ".join(["benchmarks/dp_accuracy.py", *(sys.argv[1:] if argv is None else argv)]),
        "spec": str(args.spec.relative_to(ROOT) if args.spec.is_relative_to(ROOT) else args.spec),
        "overrides": args.overrides, "config": dataclasses.asdict(config), **study,
        "summary": summary,
    }  # fmt: skip
    write_json_atomic(args.out, payload, indent=1)
    print(f"wrote {args.out} and {args.plot} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
