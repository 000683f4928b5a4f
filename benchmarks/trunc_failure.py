"""How often SEMI2K's probabilistic truncation fails, per product and per real forward.

    .venv/bin/python benchmarks/trunc_failure.py [--quick] [--out benchmarks/results/trunc_failure.json]

`protocol.truncation: probabilistic` (SPU's ``trunc_allow_msb_error``) truncates a
fixed-point product locally at each party (SecureML's two-party truncation, CrypTen's).
Its shares wrap around the ring with a probability that grows with the value truncated,
and then that one value is off by 2^(64 - 2f) = 2^28: a silent, huge error. This
script counts such failures instead of trusting a bound.

1. Per product. Secret a (|a| uniform in [2^t, 2^(t+1)), random signs, t <= 12: FM64's
   input bound is 2^13) times secret 1.0,
   n elements per call, under SEMI2K FM64 (f = 18) with probabilistic truncation. A
   failure is an output more than 1 away from a. The truncated ring value is
   |a| 2^(2f); a share wraps when party 0's uniform share falls in a window of that width,
   so the rate to expect is E|a| 2^(2f) / 2^64 (printed beside the count).
2. Per forward. The real all-MiniLM-L6-v2 (softmax with the poly exp, piecewise GeLU, the
   run spec's defaults), its weights secret, on real sentences of the bundled sentiment
   corpus at 16 tokens, under SEMI2K with each truncation; an example fails when a
   hidden state at a real token is more than 1 away from plaintext (the exact
   truncation's largest error is printed beside it). The bytes and rounds of both
   forwards come from the same runs.

Writes JSON atomically; prints a table. Full run about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from secfwt_jax.compile import protocols, simulator
from secfwt_jax.files import write_json_atomic

F = 18  # FM64's fraction bits (SPU's default)


def product_failures(t: int, n: int, calls: int, preset, seed: int = 0) -> dict:
    """Failures of ``calls`` x ``n`` secret products a * 1.0 with |a| in [2^t, 2^(t+1))."""
    failed, worst = 0, 0.0
    start = time.perf_counter()
    for c in range(calls):
        rng = np.random.default_rng([seed, t, c])
        a = (rng.uniform(1.0, 2.0, n) * rng.choice([-1.0, 1.0], n) * 2.0**t).astype(np.float32)
        one = np.ones(n, np.float32)
        out = np.asarray(simulator.mpc_execute(lambda x, y: x * y, (a, one), preset=preset).outputs)
        err = np.abs(out.astype(np.float64) - a)
        failed += int(np.sum(err > 1.0))
        worst = max(worst, float(err.max()))
    total = n * calls
    expected = 1.5 * 2.0**t * 2.0 ** (2 * F) / 2.0**64  # E|a| 2^(2f) / 2^64
    return {"t": t, "products": total, "failures": failed, "rate": failed / total,
            "expected_rate": expected, "largest_error": worst,
            "seconds": time.perf_counter() - start}  # fmt: skip


def minilm_forward_failures(batches: int, batch_size: int, seq: int = 16, exact_batches: int = 2) -> dict:  # fmt: skip
    """Real MiniLM forwards under SEMI2K, exact and probabilistic truncation, against plaintext."""
    from secfwt_jax.data.datasets import load_sentiment
    from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
    from secfwt_jax.models.config import AttentionConfig

    directory = bundled_minilm_dir()
    clf, params = load_pretrained(directory, attention=AttentionConfig(exp="poly"), gelu_impl="piecewise")  # fmt: skip
    tokenizer = load_tokenizer(directory)
    texts = load_sentiment().texts

    def hidden(p, ids, mask):
        return clf.hidden(p, {"input_ids": ids, "attention_mask": mask})[0]

    out: dict = {}
    for name in ("exact", "probabilistic"):
        preset = protocols.preset("SEMI2K", truncation=name)
        failed, worst_ok, start, cost = 0, 0.0, time.perf_counter(), None
        for b in range(exact_batches if name == "exact" else batches):  # exact: the reference
            rows = texts[b * batch_size : (b + 1) * batch_size]
            enc = tokenizer(rows, padding="max_length", truncation=True, max_length=seq, return_tensors="np")  # fmt: skip
            ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.float32)
            plain = np.asarray(hidden(params, ids, mask))
            res = simulator.mpc_execute(hidden, (params, ids, mask), public=(1, 2), preset=preset, profile=b == 0)  # fmt: skip
            cost = cost or res.cost
            err = np.abs(np.asarray(res.outputs) - plain) * mask[..., None]  # real tokens only
            per_example = err.reshape(len(rows), -1).max(axis=1)
            failed += int(np.sum(per_example > 1.0))
            worst_ok = max(worst_ok, float(per_example[per_example <= 1.0].max(initial=0.0)))
        out[name] = {"examples": (exact_batches if name == "exact" else batches) * batch_size, "failed_examples": failed,
                     "largest_error_of_the_rest": worst_ok, "bytes": cost.total_bytes,
                     "rounds": cost.max_rounds, "seconds": time.perf_counter() - start}  # fmt: skip
        r = out[name]
        print(f"MiniLM {name:13s}: {r['failed_examples']} of {r['examples']} examples failed; "
              f"rest within {r['largest_error_of_the_rest']:.2e}; {r['bytes'] / 1e6:,.1f} MB, "
              f"{r['rounds']:,.0f} rounds per batch of {batch_size}; {r['seconds']:.0f} s")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer products and forwards (a smoke run)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/trunc_failure.json"))
    args = ap.parse_args()
    preset = protocols.preset("SEMI2K", truncation="probabilistic")
    n = 1 << (16 if args.quick else 20)
    # |a| < 2^13: FM64's input bound at f = 18 (`protocols.input_bound`)
    plan = {12: 2, 10: 4, 8: 8, 6: 16, 4: 48} if not args.quick else {12: 1, 10: 1}
    products = []
    for t, calls in plan.items():
        row = product_failures(t, n, calls, preset)
        products.append(row)
        print(f"|a| ~ 2^{t:<2d}: {row['failures']:>7,} failures in {row['products']:>11,} products "
              f"(rate {row['rate']:.2e}, expected {row['expected_rate']:.2e}); "
              f"largest error {row['largest_error']:.3g}; {row['seconds']:.0f} s")  # fmt: skip
    forwards = minilm_forward_failures(1 if args.quick else 6, 4 if args.quick else 16, exact_batches=1 if args.quick else 2)  # fmt: skip
    write_json_atomic(args.out, {"protocol": "SEMI2K FM64", "fraction_bits": F,
                                 "products": products, "minilm_forward": forwards,
                                 "date": time.strftime("%Y-%m-%d")}, indent=1)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
