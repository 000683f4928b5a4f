"""How close to zero RFA's normalisers phi(q) . sum_k phi(k) come on real text, per layer.

    .venv/bin/python benchmarks/rfa_normalisers.py [--checkpoint [GELU=]DIR ...]

Trigonometric random features are not positive, so the normaliser of a query can approach
zero; in fixed point (2^-18 absolute precision, feature errors of about 6e-5) a small
normaliser turns into a large relative error of that token's attention output, and the
MPC forward drifts from plaintext. This prints, for the bundled all-MiniLM-L6-v2 and each
given (adapted) checkpoint, under the main job's attention (l2, poly, m = 32; an adapted
checkpoint under the attention its secfwt_adaptation.json records) on 64 real sentences
at 16 tokens: the smallest |normaliser| over real query tokens and heads, per layer
(`tuning.adaptation.rfa_normaliser_floor`, which `secfwt adapt` also checks). Seconds on
2 cores; nothing is written.
"""

from __future__ import annotations

import argparse

from rfa_fidelity import sentences

from secfwt_jax.data.batching import encode
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.run.build import adaptation_record
from secfwt_jax.tuning.adaptation import rfa_normaliser_floor

MAIN_JOB_RFA = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[GELU=]DIR")
    args = parser.parse_args()
    enc = encode(sentences(64, seed=0), None, load_tokenizer(bundled_minilm_dir()), 16)
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    models = [("bundled (not adapted)", bundled_minilm_dir(), "piecewise", MAIN_JOB_RFA)]
    for item in args.checkpoint:
        gelu, _, path = item.rpartition("=")
        record = adaptation_record(path)
        attention = MAIN_JOB_RFA if record is None else AttentionConfig(**record["attention"])
        models.append((path, path, gelu or "piecewise", attention))
    for label, path, gelu, attention in models:
        clf, params = load_pretrained(path, attention=attention, gelu_impl=gelu)
        floors = rfa_normaliser_floor(clf, params, batch)
        print(
            f"{label} ({gelu}, m = {attention.num_features}): min |normaliser| per layer [{', '.join(f'{f:.1e}' for f in floors)}]"
        )


if __name__ == "__main__":
    main()
