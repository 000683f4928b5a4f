"""How closely random feature attention (RFA) tracks softmax attention, in plaintext.

    .venv/bin/python benchmarks/rfa_fidelity.py      # ~1-2 minutes on 2 cores

Two tables, printed as markdown and written to benchmarks/results/rfa_fidelity.json:

1. Attention level. q, k, v are the REAL query/key/value activations of the bundled
   all-MiniLM-L6-v2 (12 heads, head_dim 32) at the inputs of layers 0 and 3, on 16 real
   sentences of the bundled sentiment corpus (padded to 32 tokens). For each variant, m
   and sigma: the relative Frobenius error ||RFA - softmax|| / ||softmax|| over real query
   tokens, mean over 3 draws of the random directions (seeds) and the 2 layers. Exact trig
   (the poly path agrees with it to ~1e-4; see tests/test_feature_maps.py).
2. Model level. The whole MiniLM with every layer's attention swapped for RFA (no
   retraining), 32 real sentences: cosine similarity of the mean-pooled sentence
   embeddings with the softmax model's (mean and min over sentences), for each variant,
   exact and poly trig, m in {64, 256}, sigma = 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from secfwt_jax.data.datasets import load_sentiment
from secfwt_jax.models.attention import random_feature_attention, softmax_attention
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.heads import HeadConfig

RESULTS = Path(__file__).parent / "results" / "rfa_fidelity.json"
VARIANTS = ("softmax_kernel", "l2", "positive")
MAX_LEN = 32


def sentences(count: int, seed: int = 0) -> list[str]:
    data = load_sentiment()
    rows = np.random.default_rng(seed).choice(len(data), size=count, replace=False)
    return [data.texts[i] for i in rows]


def tokenize(texts: list[str]) -> dict:
    enc = load_tokenizer(bundled_minilm_dir())(
        texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np"
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.float32),
        "token_type_ids": enc["token_type_ids"].astype(np.int32),
    }


def layer_qkv(clf, params, batch, layer: int):
    """Real q, k, v [B, N, H, D] at `layer`'s self-attention, from the pretrained MiniLM."""
    hidden, mask = clf.lower_hidden(params, batch, num_layers=layer)
    attn = params["bert"]["encoder"]["layer"][str(layer)]["attention"]["self"]
    shape = hidden.shape[:2] + (clf.config.num_heads, clf.config.head_dim)
    qkv = [(hidden @ attn[n]["kernel"] + attn[n]["bias"]).reshape(shape) for n in ("query", "key", "value")]  # fmt: skip
    return qkv, mask


def attention_table(clf, params, batch, ms, sigmas, seeds, layers) -> list[dict]:
    rows = []
    inputs = [layer_qkv(clf, params, batch, layer) for layer in layers]
    exact = [softmax_attention(q, k, v, mask) for (q, k, v), mask in inputs]
    real = np.asarray(batch["attention_mask"], bool)
    for variant in VARIANTS:
        for m in ms:
            for sigma in sigmas:
                errs = []
                for ((q, k, v), mask), ref in zip(inputs, exact, strict=True):
                    for seed in seeds:
                        cfg = AttentionConfig(kind="rfa", variant=variant, num_features=m, sigma=sigma, seed=seed)  # fmt: skip
                        out = np.asarray(random_feature_attention(q, k, v, mask, cfg, layer=0))
                        diff, ref_np = out[real], np.asarray(ref)[real]
                        errs.append(np.linalg.norm(diff - ref_np) / np.linalg.norm(ref_np))
                rows.append({"variant": variant, "m": m, "sigma": sigma,
                             "rel_frobenius_error": float(np.mean(errs)),
                             "std_over_draws": float(np.std(errs))})  # fmt: skip
    return rows


def embeddings(attention: AttentionConfig, batch) -> np.ndarray:
    clf, params = load_pretrained(bundled_minilm_dir(), attention=attention, gelu_impl="piecewise")
    hidden, mask = jax.jit(clf.hidden)(params, batch)
    pooled = jnp.einsum("bnh,bn->bh", hidden, mask) / jnp.sum(mask, axis=1, keepdims=True)
    return np.asarray(pooled)


def model_table(batch, ms) -> list[dict]:
    ref = embeddings(AttentionConfig(kind="softmax"), batch)
    rows = []
    for variant in VARIANTS:
        for trig in ("exact", "poly") if variant != "positive" else ("exact",):
            for m in ms:
                cfg = AttentionConfig(kind="rfa", variant=variant, trig=trig, num_features=m)
                emb = embeddings(cfg, batch)
                cos = np.sum(emb * ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))  # fmt: skip
                rows.append({"variant": variant, "trig": "n/a (exp)" if variant == "positive" else trig,
                             "m": m, "sigma": 1.0, "cosine_mean": float(np.mean(cos)),
                             "cosine_min": float(np.min(cos))})  # fmt: skip
    return rows


def markdown(attn_rows, model_rows, sigmas) -> str:
    lines = ["| variant | m | " + " | ".join(f"sigma = {s}" for s in sigmas) + " |",
             "|---|---|" + "---|" * len(sigmas)]  # fmt: skip
    keyed = {(r["variant"], r["m"], r["sigma"]): r for r in attn_rows}
    for variant in VARIANTS:
        for m in sorted({r["m"] for r in attn_rows}):
            cells = [f"{keyed[(variant, m, s)]['rel_frobenius_error']:.3f}" for s in sigmas]
            lines.append(f"| {variant} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | trig | m | cosine (mean) | cosine (min) |", "|---|---|---|---|---|"]
    for r in model_rows:
        lines.append(f"| {r['variant']} | {r['trig']} | {r['m']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    ms, sigmas = (16, 64, 256), (0.5, 1.0, 2.0)
    clf, params = load_pretrained(
        bundled_minilm_dir(), head=HeadConfig(pooling="mean"), gelu_impl="piecewise"
    )
    attn_rows = attention_table(clf, params, tokenize(sentences(16, seed=1)), ms, sigmas,
                                seeds=(0, 1, 2), layers=(0, 3))  # fmt: skip
    model_rows = model_table(tokenize(sentences(32, seed=2)), ms=(64, 256))
    table = markdown(attn_rows, model_rows, sigmas)
    print(table)
    setup = {"model": "all-MiniLM-L6-v2 (bundled)", "qkv": "real activations, layers 0 and 3",
             "attention_sentences": 16, "model_sentences": 32, "max_len": MAX_LEN,
             "seeds": [0, 1, 2], "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"setup": setup, "attention": attn_rows, "model": model_rows, "markdown": table}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out} in {setup['seconds']} s")


if __name__ == "__main__":
    main()
