"""The main run in plaintext at several sequence lengths: what a longer max_len buys.

    .venv/bin/python benchmarks/main_run_lengths.py [RUN.yaml] [--lengths 16 24 32]
        [--seeds 0 1 2] [--set KEY=VALUE ...] [--out FILE]

Runs the spec's plaintext reference (`run.reference.plaintext_reference`: the same
programs, seeds, directions and schedule as the MPC run, which `tests/test_finetune.py`
and the main run hold equal to MPC) for each max_len and model-owner seed (the seed
draws the fresh head), and prints the accuracy before and after tuning on the examples
evaluated under MPC and on the full plaintext test split, with how many training texts
the length truncates. It chooses the main run's max_len with the accuracy measured
(issue 24, item 2). Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.checkpoint import load_tokenizer
from secfwt_jax.run import build
from secfwt_jax.run.reference import plaintext_reference
from secfwt_jax.run.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def one_run(path: Path, overrides: list[str], max_len: int, seed: int) -> dict:
    spec = load_spec(path, [*overrides, f"data.max_len={max_len}"])
    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    head = build.head_config(spec, tokenizer)
    theta, frozen, public = build.model_owner_inputs(spec, head, seed, log=lambda _: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build.data_owner_inputs(spec, tokenizer, public.model_config["vocab_size"])
    truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
    programs = build.build_programs(spec, public, head, data.public())
    ref = plaintext_reference(spec, programs, theta, frozen, data, tokenizer)
    return {
        "max_len": max_len,
        "seed": seed,
        "truncated": truncated,
        "mpc_examples": {"before": ref["before"]["accuracy"], "after": ref["after"]["accuracy"]},
        "full_test": {
            "before": ref["before"]["full_test_accuracy"],
            "after": ref["after"]["full_test_accuracy"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", type=Path, default=ROOT / "configs" / "minilm_sentiment.yaml")  # fmt: skip
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 24, 32])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "main_run_lengths.json")  # fmt: skip
    args = ap.parse_args()
    try:
        load_spec(args.spec, args.set)
    except ValueError as error:  # SpecError: one line naming the field or file
        raise SystemExit(f"main_run_lengths: error: {error}") from None
    rows = []
    for max_len in args.lengths:
        for seed in args.seeds:
            r = one_run(args.spec, args.set, max_len, seed)
            rows.append(r)
            m, f = r["mpc_examples"], r["full_test"]
            print(f"max_len {max_len:3d} seed {seed}: MPC examples {100 * m['before']:5.1f} -> {100 * m['after']:5.1f}%, "
                  f"full split {100 * f['before']:5.1f} -> {100 * f['after']:5.1f}%", flush=True)  # fmt: skip
    summary = {}
    for max_len in args.lengths:
        got = [r for r in rows if r["max_len"] == max_len]
        summary[str(max_len)] = {
            "full_test_after_mean": statistics.mean(r["full_test"]["after"] for r in got),
            "mpc_examples_after_mean": statistics.mean(r["mpc_examples"]["after"] for r in got),
        }
        s = summary[str(max_len)]
        print(f"max_len {max_len:3d}: mean after tuning, full split {100 * s['full_test_after_mean']:.1f}%, "
              f"MPC examples {100 * s['mpc_examples_after_mean']:.1f}% ({len(got)} seeds)")  # fmt: skip
    write_json_atomic(args.out, {"spec": str(args.spec), "overrides": args.set, "date": time.strftime("%Y-%m-%d"),
                                 "runs": rows, "summary": summary}, indent=1)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
