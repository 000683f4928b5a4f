"""Gaussian vs Rademacher SPSA directions on real data, in plaintext: same budget, same seeds.

    .venv/bin/python benchmarks/spsa_directions.py            # ~5-10 minutes on 2 cores

Setting (as benchmarks/accuracy.py): the bundled all-MiniLM-L6-v2 (softmax attention), the
bundled binary sentiment corpus, k examples per class for training, a fixed stratified
test set, the frozen lower trunk cached, mean pooling. Two trainable sets:

  head  the linear head alone (770 parameters), from zero;
  lora  rank-4 LoRA on the top layer's query and value (6k) + the head, from zero
        (accuracy.py's `spsa_problem(..., "lora")`).

Each runs `loop.train_spsa` with `SpsaConfig(directions=...)` for both kinds, the same seeds,
step size and eps; reported: train loss (first and mean of the last 10 steps) and test
accuracy. Rademacher directions make the SPSA update free under MPC (0 bytes against 64
bytes per parameter, ABY3 FM64), so they are worth it if they converge as well.
Writes benchmarks/results/spsa_directions.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from accuracy import BATCH, Model  # noqa: E402

from secfwt_jax.data import encode, k_shot_splits, load_sentiment  # noqa: E402
from secfwt_jax.files import write_json_atomic  # noqa: E402
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_tokenizer  # noqa: E402
from secfwt_jax.models.config import AttentionConfig  # noqa: E402
from secfwt_jax.tuning import loop, sets, spsa  # noqa: E402
from secfwt_jax.tuning.schedules import ScheduleConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "spsa_directions.json"
SETTINGS = {"head": {"lr": 1e-2, "eps": 1e-3}, "lora": {"lr": 1e-2, "eps": 1e-3}}


def head_problem(model) -> sets.TuningProblem:
    """The linear head alone, from zero, over the cached trunk (frozen: the pretrained tree)."""
    clf, first = model.classifier, model.first
    zero = jax.tree_util.tree_map(np.zeros_like, model.params[clf.head_name])

    def logits(t, f, b):
        merged = {**f, clf.head_name: t[clf.head_name]}
        return clf.upper_logits(merged, b["hidden"], b["attention_mask"], b, first)

    spec = model.problem.spec
    return sets.TuningProblem(spec, {clf.head_name: zero}, model.params, logits, model.problem.prepare)  # fmt: skip


def run_one(model, head, cache, test_cache, setting, kind, seed, args) -> dict:
    zero = jax.tree_util.tree_map(np.zeros_like, head)
    problem = model.spsa_problem(zero, "lora", seed) if setting == "lora" else head_problem(model)
    cfg = spsa.SpsaConfig(eps=SETTINGS[setting]["eps"], num_directions=args.k_dirs, directions=kind)
    sched = ScheduleConfig("constant", peak=SETTINGS[setting]["lr"], total_steps=args.steps)
    batches = loop.cycle_minibatches(cache, BATCH, seed)
    tuned, hist = loop.train_spsa(problem, batches, cfg, sched, args.steps, seed)
    losses = [h["loss"] for h in hist]
    acc = loop.evaluate(problem, tuned, test_cache)["accuracy"]
    return {"setting": setting, "kind": kind, "seed": seed, "loss_first": losses[0],
            "loss_last10": float(np.mean(losses[-10:])), "test_accuracy": acc,
            "loss_curve_every_10": losses[::10]}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16, help="training examples per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[13, 21, 42])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k-dirs", type=int, default=1, help="SPSA directions per step")
    ap.add_argument("--test-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="encode: truncated")
    start = time.time()
    data, tok = load_sentiment(binary=True), load_tokenizer(bundled_minilm_dir())
    fixed = k_shot_splits(data, 1, 0, dev_k=0, test_size=args.test_size, stratify_test=True)
    rest = data.subset(np.setdiff1d(np.arange(len(data)), fixed.test_rows))
    model = Model("softmax", AttentionConfig(kind="softmax"))
    test_cache = model.cache(encode(fixed.test.texts, fixed.test.labels, tok, args.max_len, num_labels=2))  # fmt: skip
    runs = []
    for seed in args.seeds:
        split = k_shot_splits(rest, args.k, seed, dev_k=0, test_size=0).train
        cache = model.cache(encode(split.texts, split.labels, tok, args.max_len, num_labels=2))
        head = model.params[model.classifier.head_name]  # shape only: both sets start at 0
        for setting in args.settings:
            for kind in ("gaussian", "rademacher"):
                r = run_one(model, head, cache, test_cache, setting, kind, seed, args)
                runs.append(r)
                print(f"seed {seed} {setting:<5} {kind:<10} loss {r['loss_first']:.4f} -> "
                      f"{r['loss_last10']:.4f}  test acc {r['test_accuracy']:.3f}", flush=True)  # fmt: skip
    lines = ["| trainable set | directions | train loss first -> last 10 (mean over seeds) | test accuracy (mean, min..max) |",
             "|---|---|---|---|"]  # fmt: skip
    for setting in args.settings:
        for kind in ("gaussian", "rademacher"):
            rs = [r for r in runs if r["setting"] == setting and r["kind"] == kind]
            acc = [r["test_accuracy"] for r in rs]
            lines.append(f"| {setting} | {kind} | {np.mean([r['loss_first'] for r in rs]):.4f} -> "
                         f"{np.mean([r['loss_last10'] for r in rs]):.4f} | {np.mean(acc):.3f} "
                         f"({min(acc):.3f}..{max(acc):.3f}) |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    payload = {"command": "python benchmarks/spsa_directions.py " + " ".join(argv or sys.argv[1:]),
               "settings": {**vars(args), "out": str(args.out), "per_set": SETTINGS},
               "runs": runs, "markdown": table, "seconds": time.time() - start}  # fmt: skip
    write_json_atomic(args.out, payload, indent=1)
    print(f"wrote {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
