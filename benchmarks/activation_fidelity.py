"""What a cheaper GeLU costs in accuracy, on the real model and the real data, and what it
saves under MPC.

    .venv/bin/python benchmarks/activation_fidelity.py \
        --adapted piecewise=adapted/minilm-rfa-l2-m32 --adapted relu=adapted/minilm-rfa-l2-m32-relu

(the adapted checkpoints come from `secfwt adapt configs/minilm_sentiment.yaml [--set
model.gelu=relu] --out DIR`; missing ones are skipped and say so). About 5 minutes on 2
cores. Writes benchmarks/results/activation_fidelity.json and prints markdown.

1. MPC cost of one GeLU element, ABY3 and SEMI2K FM64, for each `ModelConfig.gelu_impl`.
2. The bundled all-MiniLM-L6-v2 with the main run's attention (RFA l2, poly, m = 32) and
   each GeLU, before and after the model owner's adaptation (an adapted checkpoint runs
   with the attention its secfwt_adaptation.json records, e.g. m = 16), against the
   original model (softmax, exact GeLU), on the bundled sentiment corpus at the main
   job's 16 tokens:
   - the cosine of the mean-pooled sentence embeddings with the original's (500 test rows);
   - frozen-feature probe accuracy on the same stratified 500-row test split (seed 13): a
     logistic regression (scikit-learn, C = 1 on standardised features) trained on
     k = 24 per class (the main run's 48 examples; mean and range over 5 draws) and on
     k = 256 per class (how much the features themselves lost).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from secfwt_jax.data.batching import encode
from secfwt_jax.data.datasets import load_sentiment
from secfwt_jax.data.sampling import k_shot_splits
from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
from secfwt_jax.models.config import GELU_IMPLS, AttentionConfig
from secfwt_jax.models.encoder import activation_fn
from secfwt_jax.run.build import adaptation_record

RESULTS = Path(__file__).parent / "results" / "activation_fidelity.json"
MAIN_JOB_RFA = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32)
MAX_LEN, TEST_SIZE, SPLIT_SEED = 16, 500, 13
PROBE_SEEDS = (0, 1, 2, 3, 4)


def element_costs() -> list[dict]:
    """Bytes and rounds per element of each GeLU implementation (4,096 elements)."""
    from secfwt_jax.compile import profiler, protocols

    x = np.random.default_rng(0).normal(-0.6, 1.5, 4096).astype(np.float32)
    rows = []
    for impl in GELU_IMPLS:
        row = {"gelu": impl}
        for proto in ("ABY3", "SEMI2K"):
            prof = profiler.profile_function(activation_fn("gelu", impl), (x,), (),
                                             protocols.preset(proto), name=f"gelu_{impl}")  # fmt: skip
            row[proto] = {"bytes_per_element": prof.total_bytes / x.size, "rounds": prof.rounds}
        rows.append(row)
    return rows


def pooled_features(checkpoint: Path, attention, gelu: str, batch: dict) -> np.ndarray:
    clf, params = load_pretrained(checkpoint, attention=attention, gelu_impl=gelu)
    hidden, mask = jax.jit(clf.hidden)(params, batch)
    pooled = jnp.einsum("bnh,bn->bh", hidden, mask) / jnp.sum(mask, axis=1, keepdims=True)
    return np.asarray(pooled)


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def model_rows(variants: list[tuple[str, Path, AttentionConfig, str]]) -> list[dict]:
    data = load_sentiment()
    big = k_shot_splits(data, 256, SPLIT_SEED, dev_k=0, test_size=TEST_SIZE, stratify_test=True)
    test_rows = big.test_rows
    small = [k_shot_splits(data, 24, s, dev_k=0, test_size=None).train_rows for s in PROBE_SEEDS]
    small = [r[~np.isin(r, test_rows)] for r in small]  # never train on a test row
    rows_needed = np.unique(np.concatenate([test_rows, big.train_rows, *small]))
    index = {r: i for i, r in enumerate(rows_needed)}
    tokenizer = load_tokenizer(bundled_minilm_dir())
    batch = encode([data.texts[r] for r in rows_needed], None, tokenizer, MAX_LEN)
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}  # fmt: skip

    def at(rows):
        return np.array([index[r] for r in rows])

    labels = data.labels[rows_needed]
    reference = None
    out = []
    for label, checkpoint, attention, gelu in variants:
        feats = pooled_features(checkpoint, attention, gelu, batch)
        if reference is None:
            reference = feats
        ref, f = reference[at(test_rows)], feats[at(test_rows)]
        cos = np.sum(ref * f, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(f, axis=1))
        small_acc = [probe_accuracy(feats[at(r)], labels[at(r)], f, labels[at(test_rows)]) for r in small]  # fmt: skip
        big_acc = probe_accuracy(feats[at(big.train_rows)], labels[at(big.train_rows)], f, labels[at(test_rows)])  # fmt: skip
        row = {"model": label, "checkpoint": str(checkpoint), "gelu": gelu,
               "attention": dataclasses.asdict(attention),
               "cosine_to_original_mean": float(cos.mean()), "cosine_to_original_min": float(cos.min()),
               "probe_k24_mean": float(np.mean(small_acc)), "probe_k24_min": float(np.min(small_acc)),
               "probe_k24_max": float(np.max(small_acc)), "probe_k256": big_acc}  # fmt: skip
        print(f"{label}: cosine {row['cosine_to_original_mean']:.4f}, probe k=24 "
              f"{row['probe_k24_mean']:.3f}, k=256 {big_acc:.3f}", flush=True)  # fmt: skip
        out.append(row)
    return out


def markdown(costs: list[dict], models: list[dict]) -> str:
    lines = ["| GeLU | ABY3 B/elem | ABY3 rounds | SEMI2K B/elem | SEMI2K rounds |", "|---|---|---|---|---|"]  # fmt: skip
    for r in costs:
        a, s = r["ABY3"], r["SEMI2K"]
        lines.append(f"| {r['gelu']} | {a['bytes_per_element']:,.0f} | {a['rounds']:.1f} | "
                     f"{s['bytes_per_element']:,.0f} | {s['rounds']:.1f} |")  # fmt: skip
    lines += ["", "| model | cosine to original (mean / min) | probe k = 24 (mean, min..max) | probe k = 256 |",
              "|---|---|---|---|"]  # fmt: skip
    for r in models:
        lines.append(f"| {r['model']} | {r['cosine_to_original_mean']:.4f} / {r['cosine_to_original_min']:.4f} | "
                     f"{r['probe_k24_mean']:.3f} ({r['probe_k24_min']:.3f}..{r['probe_k24_max']:.3f}) | "
                     f"{r['probe_k256']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def adapted_attention(path: Path) -> AttentionConfig:
    """The attention settings an adapted checkpoint was made for (its secfwt_adaptation.json;
    the main run's when the file is absent)."""
    record = adaptation_record(path)
    return MAIN_JOB_RFA if record is None else AttentionConfig(**record["attention"])


def variants_from(adapted: list[str]) -> list[tuple[str, Path, AttentionConfig, str]]:
    base = bundled_minilm_dir()
    out = [("original (softmax, exact GeLU)", base, AttentionConfig(kind="softmax"), "exact")]
    out += [(f"RFA m=32, {g} GeLU, not adapted", base, MAIN_JOB_RFA, g) for g in ("piecewise", "relu", "quad")]  # fmt: skip
    for item in adapted:
        gelu, _, path = item.partition("=")
        if gelu not in GELU_IMPLS or not path:
            raise SystemExit(f"--adapted: expected GELU=DIR with GELU one of {GELU_IMPLS}, got {item!r}")  # fmt: skip
        if not (Path(path) / "config.json").is_file():
            print(f"--adapted: no checkpoint at {path}; skipped")
            continue
        attention = adapted_attention(Path(path))
        out.append((f"RFA m={attention.num_features}, {gelu} GeLU, adapted", Path(path), attention, gelu))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapted", action="append", default=[], metavar="GELU=DIR")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    variants = variants_from(args.adapted)
    costs = element_costs()
    models = model_rows(variants)
    table = markdown(costs, models)
    print(table)
    setup = {"model": "all-MiniLM-L6-v2 (bundled)", "data": "bundled sentiment (binary)",
             "max_len": MAX_LEN, "test_size": TEST_SIZE, "split_seed": SPLIT_SEED,
             "probe_seeds": list(PROBE_SEEDS), "seconds": round(time.perf_counter() - start, 1),
             "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    write_json_atomic(args.out, {"setup": setup, "costs": costs, "models": models, "markdown": table}, indent=2)  # fmt: skip
    print(f"wrote {args.out} in {setup['seconds']} s")


if __name__ == "__main__":
    main()
