"""How close to zero RFA's normalisers phi(q) . sum_k phi(k) come on real text, per layer.

    .venv/bin/python benchmarks/rfa_normalisers.py [--checkpoint [GELU=]DIR ...]

Trigonometric random features are not positive, so the normaliser of a query can approach
zero; in fixed point (2^-18 absolute precision, feature errors of about 6e-5) a small
normaliser turns into a large relative error of that token's attention output, and the
MPC forward drifts from plaintext. This prints, for the bundled all-MiniLM-L6-v2 and each
given (adapted) checkpoint, under the main run's attention (l2, poly, m = 32; an adapted
checkpoint under the attention its secfwt_adaptation.json records) on 64 real sentences
at 16 tokens: the smallest |normaliser| over real query tokens and heads, per layer
(`tuning.adaptation.rfa_normaliser_floor`, which `secfwt adapt` also checks). Seconds on
2 cores; nothing is written.

    --first-rows N   the first N rows of the bundled corpus instead of 64 sampled ones
    --mpc            also run the whole trunk under SPU (ABY3 FM64, the simulator) and
                     print, per sentence, its smallest normaliser over all layers next to
                     the largest |MPC - plaintext| of its final hidden states: the
                     sentences with the smallest normalisers are the ones that drift
                     (about a minute per checkpoint)
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from activation_fidelity import MAIN_JOB_RFA, adapted_attention
from rfa_fidelity import sentences

from secfwt_jax.data.batching import encode
from secfwt_jax.data.datasets import load_sentiment
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained, load_tokenizer
from secfwt_jax.tuning.adaptation import layer_states, rfa_normaliser_floor, rfa_normalisers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="[GELU=]DIR")
    parser.add_argument("--first-rows", type=int, default=0, metavar="N")
    parser.add_argument("--mpc", action="store_true")
    args = parser.parse_args()
    texts = load_sentiment().texts[: args.first_rows] if args.first_rows else sentences(64, seed=0)
    enc = encode(list(texts), None, load_tokenizer(bundled_minilm_dir()), 16)
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    models = [("bundled (not adapted)", bundled_minilm_dir(), "piecewise", MAIN_JOB_RFA)]
    for item in args.checkpoint:
        gelu, _, path = item.rpartition("=")
        models.append((path, path, gelu or "piecewise", adapted_attention(path)))
    for label, path, gelu, attention in models:
        clf, params = load_pretrained(path, attention=attention, gelu_impl=gelu)
        floors = rfa_normaliser_floor(clf, params, batch)
        print(
            f"{label} ({gelu}, m = {attention.num_features}): min |normaliser| per layer [{', '.join(f'{f:.1e}' for f in floors)}]"
        )
        if args.mpc:
            mpc_drift(clf, params, batch)


def mpc_drift(clf, params, batch) -> None:
    """Per sentence: smallest |normaliser| (any layer, head, real token) and the largest
    |MPC - plaintext| of the final hidden states, the 6 worst sentences and the median."""
    from secfwt_jax.compile import protocols
    from secfwt_jax.compile.simulator import mpc_execute

    real = np.asarray(batch["attention_mask"], bool)
    den = np.abs(np.asarray(rfa_normalisers(clf, params, layer_states(clf, params, batch), batch["attention_mask"])))  # fmt: skip
    floor = np.where(real[None, :, :, None], den, np.inf).min(axis=(0, 2, 3))
    trunk = params[clf.trunk_name]
    num_layers = clf.config.num_layers
    fn = lambda p, b: clf.lower_hidden({clf.trunk_name: p}, b, num_layers=num_layers)[0]  # noqa: E731
    want = np.asarray(jax.jit(fn)(trunk, batch))
    got = mpc_execute(fn, (trunk, batch), preset=protocols.preset("ABY3")).outputs
    drift = np.where(real[:, :, None], np.abs(got - want), 0.0).max(axis=(1, 2))
    worst = np.argsort(drift)[::-1][:6]
    print(f"  MPC drift (max |MPC - plaintext| of the final hidden states): median {np.median(drift):.1e}")  # fmt: skip
    for i in worst:
        print(f"    sentence {i}: drift {drift[i]:.1e}, smallest normaliser {floor[i]:.3f}")
    print(f"  sentences with a normaliser < 0.2: {int((floor < 0.2).sum())}, their median drift "
          f"{np.median(drift[floor < 0.2]) if (floor < 0.2).any() else float('nan'):.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
