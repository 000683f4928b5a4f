"""The Llama-family decoder against transformers' `FlaxLlamaForCausalLM`, on checkpoints
that transformers writes with `save_pretrained` and `load_pretrained` reads back.

Two known differences of the reference (transformers 4.57) are bridged explicitly:
- it builds its rotary table with base 10000 whatever `rope_theta` says, so parity runs at
  rope_theta = 1e4, and rope_theta = 1e5 (SmolLM2's) is held against a numpy rotation;
- it never ties `lm_head`, so for a tied checkpoint the reference gets the embedding table
  as its `lm_head` kernel.

Compared: next-token logits at the real tokens of a right-padded batch (pads are never
read downstream and, causally, never seen by a real token).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from transformers import FlaxLlamaForCausalLM, LlamaConfig  # noqa: E402

from secfwt_jax.models.checkpoint import load_pretrained  # noqa: E402
from secfwt_jax.models.config import AttentionConfig  # noqa: E402
from secfwt_jax.models.heads import HeadConfig  # noqa: E402
from secfwt_jax.models.llama import apply_rotary, rotary_tables  # noqa: E402
from secfwt_jax.models.mpc_ops import silu_piecewise  # noqa: E402

TOL = 1e-5
VOCAB = 97


def llama_config(kv_heads: int, tied: bool, **overrides) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=kv_heads, rope_theta=10000.0,
                  max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                  pad_token_id=0)  # fmt: skip
    return LlamaConfig(**(fields | overrides))


def write_checkpoint(path, config: LlamaConfig, seed: int = 0):
    """A random FlaxLlamaForCausalLM saved by transformers; norm weights made non-trivial."""
    model = FlaxLlamaForCausalLM(config, seed=seed)
    params = jax.tree_util.tree_map(np.asarray, model.params)
    rng = np.random.default_rng(seed)
    for layer in params["model"]["layers"].values():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layer[norm]["weight"] = rng.uniform(0.5, 1.5, layer[norm]["weight"].shape).astype(np.float32)  # fmt: skip
    if config.tie_word_embeddings:
        params.pop("lm_head")
    model.save_pretrained(path, params=params)
    return params


def batch():
    ids = np.array([[5, 17, 33, 2, 81, 9, 40, 12], [7, 3, 60, 22, 0, 0, 0, 0]], np.int32)
    mask = (np.arange(8)[None] < np.array([[8], [4]])).astype(np.float32)
    return ids, mask


def reference_logits(path, params, tied: bool):
    model = FlaxLlamaForCausalLM.from_pretrained(path)
    ref = jax.tree_util.tree_map(np.asarray, model.params)
    if tied:  # the reference's lm_head is untied (and random): give it the embeddings
        ref["lm_head"] = {"kernel": params["model"]["embed_tokens"]["embedding"].T}
    ids, mask = batch()
    return np.asarray(model(ids, attention_mask=mask, params=ref).logits)


@pytest.mark.parametrize("kv_heads", [6, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama_matches_transformers_flax_llama(tmp_path, kv_heads, tied):
    config = llama_config(kv_heads, tied)
    params = write_checkpoint(tmp_path, config)
    classifier, ours = load_pretrained(tmp_path, head=HeadConfig(kind="lm", verbalizer_ids=(3, 4)))
    assert classifier.config.kv_heads == kv_heads and classifier.config.tie_embeddings == tied
    assert ("lm_head" in ours) == (not tied)
    ids, mask = batch()
    got = np.asarray(classifier.next_token_logits(ours, {"input_ids": ids, "attention_mask": mask}))
    want = reference_logits(tmp_path, params, tied)
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - want[real])) < TOL


def test_the_verbalizer_head_scores_the_next_token_logits_of_its_words(tmp_path):
    write_checkpoint(tmp_path, llama_config(2, True))
    classifier, params = load_pretrained(
        tmp_path, head=HeadConfig(kind="lm", verbalizer_ids=(11, 42))
    )
    ids, mask = batch()
    select = np.zeros(mask.shape, np.float32)
    select[0, 7], select[1, 3] = 1, 1  # the last real token
    feed = {"input_ids": ids, "attention_mask": mask, "select": select}
    scores = np.asarray(classifier.logits(params, feed))
    full = np.asarray(classifier.next_token_logits(params, feed))
    np.testing.assert_allclose(scores, full[[0, 1], [7, 3]][:, [11, 42]], atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "rfa"])
def test_the_last_layer_at_the_scored_position_alone_gives_the_full_models_scores(
    tmp_path, attention
):
    """The verbalizer head runs the last layer for the scored token only (its query, its
    attention row, its MLP): whole model, cached lower layers and a soft prompt agree with
    the full stack's next-token logits at that position."""
    write_checkpoint(tmp_path, llama_config(2, True))
    rfa = AttentionConfig(kind="rfa", num_features=16, variant="l2") if attention == "rfa" else None
    classifier, params = load_pretrained(tmp_path, rfa, HeadConfig(kind="lm", verbalizer_ids=(11, 42)))  # fmt: skip
    assert classifier.scores_one_position
    ids, mask = batch()
    select = np.zeros(mask.shape, np.float32)
    select[0, 5], select[1, 3] = 1, 1  # row 0 scores a token with later real tokens after it
    feed = {"input_ids": ids, "attention_mask": mask, "select": select}
    full = np.asarray(classifier.next_token_logits(params, feed))[[0, 1], [5, 3]][:, [11, 42]]
    np.testing.assert_allclose(np.asarray(classifier.logits(params, feed)), full, atol=1e-5)
    hidden, hmask = classifier.lower_hidden(params, feed, 1)
    cached = classifier.upper_logits(params, hidden, hmask, feed, 1)
    np.testing.assert_allclose(np.asarray(cached), full, atol=1e-5)
    prompt = np.random.default_rng(1).normal(0, 0.02, (1, 3, 48)).astype(np.float32)
    prompted = np.asarray(classifier.logits(params, feed, prompt=jnp.asarray(prompt)))
    reference = dataclasses.replace(classifier, head=dataclasses.replace(classifier.head, kind="linear"))  # fmt: skip
    h_full, _ = reference.hidden(params, feed, jnp.asarray(prompt))
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])[[11, 42]]
    want = np.asarray(h_full)[[0, 1], [5 + 3, 3 + 3]] @ table.T
    np.testing.assert_allclose(prompted, want, atol=1e-5)


def test_rotary_positions_use_rope_theta():
    """Hugging Face's rotation x cos + rotate_half(x) sin, at SmolLM2's base 1e5."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
    sin, cos = rotary_tables(5, 8, 1e5)
    got = np.asarray(apply_rotary(jnp.asarray(x), sin, cos))
    for pos in range(5):
        for i in range(4):  # pair (i, i + 4) rotates by pos / theta^(2i / d)
            angle = pos / 1e5 ** (2 * i / 8)
            a, b = x[0, pos, :, i], x[0, pos, :, i + 4]
            np.testing.assert_allclose(got[0, pos, :, i], a * np.cos(angle) - b * np.sin(angle), atol=1e-6)  # fmt: skip
            np.testing.assert_allclose(got[0, pos, :, i + 4], b * np.cos(angle) + a * np.sin(angle), atol=1e-6)  # fmt: skip


def test_causal_rfa_runs_on_the_rotated_queries_and_keys(tmp_path):
    """RFA replaces softmax in every layer; real tokens never see later tokens."""
    write_checkpoint(tmp_path, llama_config(2, True))
    rfa = AttentionConfig(kind="rfa", num_features=16, variant="l2")
    classifier, params = load_pretrained(
        tmp_path, rfa, HeadConfig(kind="lm", verbalizer_ids=(1, 2))
    )
    ids, mask = batch()
    logits = np.asarray(classifier.next_token_logits(params, {"input_ids": ids, "attention_mask": mask}))  # fmt: skip
    changed = ids.copy()
    changed[0, 5:] = [1, 2, 3]  # later tokens change; earlier positions' outputs must not
    again = np.asarray(classifier.next_token_logits(params, {"input_ids": changed, "attention_mask": mask}))  # fmt: skip
    np.testing.assert_allclose(logits[0, :5], again[0, :5], atol=1e-5)
    assert np.max(np.abs(logits[0, 5:] - again[0, 5:])) > 1e-3


@pytest.mark.parametrize(("form", "bound"), [("piecewise", 6e-4), ("piecewise_lite", 9e-3)])
def test_silu_forms_hold_their_error_over_the_real_line(form, bound):
    x = np.linspace(-40, 40, 160001).astype(np.float32)
    err = np.abs(np.asarray(silu_piecewise(jnp.asarray(x), form)) - np.asarray(jax.nn.silu(x)))
    assert err.max() < bound
