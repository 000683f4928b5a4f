"""Every model family's forward compiles for SPU and matches plaintext (tiny configs).

Each case compiles one tiny classifier (hidden 16, 2 heads, 2 layers, seq 6, batch 2,
vocab 24) with SECRET parameters and SECRET one-hot inputs and mask, runs it in the
in-process simulator, and compares the logits with the same function in float32.
Protocols alternate between SEMI2K and ABY3 so both are covered without running every
case twice.

Tolerance. FM64 with 18 fraction bits resolves 2^-18 ~ 3.8e-6, but the forward chains
~10 nonlinear approximations per layer (LayerNorm's rsqrt, gelu, softmax's exp and max or
RFA's l2 rsqrt, polynomial trig and reciprocal), each with a relative error of ~1e-4 to
1e-3 in SPU, and RFA's reciprocal amplifies errors where its denominator is small (m = 8
here). Measured max abs errors: 1e-3 to 5e-3 on logits up to 13, and 4e-2 on logits up to
7.5 for bert/rfa/SEMI2K (`pytest -s` prints them). ATOL + RTOL * |logit| = 0.03 + 0.02
|logit| leaves a margin of about 4x there while a miscompiled op (errors of order 0.1 to
10; one was all-zero logits) still fails.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from secfwt_jax.compile import compiler, protocols, simulator
from secfwt_jax.models.attention import random_feature_attention
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig

ATOL, RTOL = 0.03, 0.02
VOCAB, SEQ, BATCH = 24, 6, 2
RFA = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=8)
SOFTMAX = AttentionConfig(kind="softmax")


def tiny_classifier(family: str, attention: AttentionConfig) -> Classifier:
    llama = {"num_kv_heads": 1, "silu_impl": "piecewise", "activation": "silu", "layer_norm_eps": 1e-5}  # fmt: skip
    config = ModelConfig(
        family=family,
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        max_positions=16,
        type_vocab_size=0 if family == "gpt2" else 2,
        layer_norm_eps=1e-5 if family == "gpt2" else 1e-12,
        activation="gelu_new" if family == "gpt2" else "gelu",
        pad_token_id=1 if family == "roberta" else 0,
        attention=attention,
    )
    if family == "llama":  # grouped-query attention (2 query heads, 1 kv head), MPC SiLU
        config = dataclasses.replace(config, type_vocab_size=0, **llama)
    if config.causal:
        return Classifier(config, HeadConfig(kind="lm", num_labels=2, verbalizer_ids=(5, 9)))
    pooling = "cls" if family == "bert" else "mean"
    return Classifier(config, HeadConfig(kind="linear", num_labels=3, pooling=pooling))


def scaled_params(clf: Classifier, seed: int) -> dict:
    """Flax init, with the output side scaled up so logits are O(1): the normal(0.02)
    head (and GPT-2's tied `wte`) would make every logit, and so every error, tiny."""
    params = clf.init(seed, SEQ)
    if clf.config.family in ("gpt2", "llama"):
        trunk = params[clf.trunk_name]
        emb = trunk["wte"] if clf.config.family == "gpt2" else trunk["embed_tokens"]
        emb["embedding"] = emb["embedding"] * 50.0
    else:
        params["classifier"]["kernel"] = params["classifier"]["kernel"] * 50.0
    return params


def one_hot_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, VOCAB, size=(BATCH, SEQ))
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[1, 4:] = 0.0  # right padding in the second example
    last = mask.sum(axis=1).astype(int) - 1
    return {
        "input_ids": np.eye(VOCAB, dtype=np.float32)[ids],
        "attention_mask": mask,
        "select": np.eye(SEQ, dtype=np.float32)[last],
    }


CASES = [
    ("bert", "rfa", "SEMI2K"),
    ("bert", "softmax", "ABY3"),
    ("roberta", "rfa", "ABY3"),
    ("roberta", "softmax", "SEMI2K"),
    ("gpt2", "rfa", "ABY3"),
    ("gpt2", "softmax", "SEMI2K"),
    ("llama", "rfa", "ABY3"),
    ("llama", "softmax", "SEMI2K"),
    ("llama", "softmax", "CHEETAH"),
]


@pytest.mark.parametrize(("family", "attention", "protocol"), CASES)
def test_forward_compiles_and_matches_plaintext_under_spu(family, attention, protocol):
    clf = tiny_classifier(family, RFA if attention == "rfa" else SOFTMAX)
    params, batch = scaled_params(clf, seed=0), one_hot_batch(seed=1)

    def forward(params, batch):
        return clf.logits(params, batch)

    plain = np.asarray(jax.jit(forward)(params, batch))
    res = simulator.mpc_execute(forward, (params, batch), preset=protocols.preset(protocol))
    mpc = np.asarray(res.outputs)
    err = np.abs(mpc - plain)
    print(
        f"{family}/{attention}/{protocol}: max abs err {err.max():.2e}, max |logit| {np.abs(plain).max():.2f}"
    )
    assert np.all(np.isfinite(mpc))
    assert np.all(
        err <= ATOL + RTOL * np.abs(plain)
    ), f"{family}/{attention}/{protocol}: max err {err.max():.3g}, logits {plain.round(3)}"


@pytest.mark.parametrize("truncation", ["exact", "probabilistic"])
def test_semi2k_rfa_in_the_reused_order_matches_plaintext(truncation):
    """What a SEMI2K run spec builds: RFA's sin/cos in the order that opens each value
    once, with the openings cached (`compile/openings.py`), under either truncation."""
    reused = dataclasses.replace(RFA, trig_schedule="reused")
    clf = tiny_classifier("bert", reused)
    params, batch = scaled_params(clf, seed=0), one_hot_batch(seed=1)
    plain = np.asarray(jax.jit(clf.logits)(params, batch))
    preset = protocols.preset("SEMI2K", truncation=truncation)
    assert "cache_openings" in preset.rewrites
    mpc = np.asarray(simulator.mpc_execute(clf.logits, (params, batch), preset=preset).outputs)
    assert np.all(np.abs(mpc - plain) <= ATOL + RTOL * np.abs(plain)), (mpc, plain)


def test_a_llama_deep_prompt_over_cached_layers_matches_plaintext_under_spu():
    """The prompt tuning programs' forward: p = A z (public A, secret z) put before the
    cached layer-1 hidden states, the top layer at the scored position, the verbalizer
    (softmax, as the shipped LLM spec; measured 3.1e-4 on logits up to 12, and 4.6e-5 with
    RFA)."""
    from secfwt_jax.tuning import sets

    clf = tiny_classifier("llama", SOFTMAX)
    params, batch = scaled_params(clf, seed=0), one_hot_batch(seed=1)
    spec = sets.TrainableSpec("prompt", prompt_length=3, intrinsic_dim=8, top_layers=1, cache_trunk=True)  # fmt: skip
    problem = sets.build_problem(spec, clf, params)
    cached = {k: np.asarray(v) for k, v in problem.prepare(batch).items()}
    z = {"z": np.random.default_rng(4).normal(0, 2.0, 8).astype(np.float32)}

    def forward(z, frozen, cached):
        return problem.logits(z, frozen, cached)

    plain = np.asarray(jax.jit(forward)(z, problem.frozen, cached))
    bare = np.asarray(forward({"z": np.zeros(8, np.float32)}, problem.frozen, cached))
    assert np.abs(plain - bare).max() > 0.05  # the prompt moves the scores
    res = simulator.mpc_execute(
        forward, (z, problem.frozen, cached), preset=protocols.preset("ABY3")
    )
    err = np.abs(np.asarray(res.outputs) - plain)
    print(f"llama deep prompt: max abs err {err.max():.2e}, max |logit| {np.abs(plain).max():.2f}")  # fmt: skip
    assert np.all(err <= ATOL + RTOL * np.abs(plain)), (err.max(), plain)


def test_l2_poly_rfa_program_has_no_trig_clip_and_no_spu_trig():
    # The l2 variant's trig arguments are bounded by max_j |w_j|, so the polynomial path
    # needs no clip (a secret comparison costs ~8 rounds) and no SPU sine/cosine. The two
    # comparison ops are the bucketed rsqrt's (1/|x|) and reciprocal's (the normaliser).
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(1, 8, 2, 8)).astype(np.float32) for _ in "qkv")
    mask = np.ones((1, 8), np.float32)

    def attention(q, k, v):
        return random_feature_attention(q, k, v, mask, RFA, layer=0)

    text = compiler.compile_to_pphlo(attention, (q, k, v)).pphlo_text
    for op in ("pphlo.greater", "pphlo.sine", "pphlo.cosine", "pphlo.select"):
        assert op not in text, op
    assert text.count("= pphlo.less ") == 2
    res = simulator.mpc_execute(attention, (q, k, v), preset=protocols.preset("SEMI2K"))
    np.testing.assert_allclose(res.outputs, attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("type_vocab", [1, 2])
def test_secret_token_types_are_looked_up_without_spus_gather_loop(type_vocab):
    # SPU gathers at secret indices in a loop (about 45 rounds per index): 17,408 of a
    # MiniLM trunk chunk's 18,965 rounds were its 384 token types.
    from secfwt_jax.models.encoder import TokenEmbedding

    emb = TokenEmbedding(type_vocab, 16)
    params = emb.init(jax.random.PRNGKey(0), np.zeros((1, 1), np.int32))
    ids = (np.arange(48).reshape(3, 16) % type_vocab).astype(np.int32)
    lookup = lambda p, i: emb.apply(p, i)  # noqa: E731
    np.testing.assert_allclose(lookup(params, ids), np.asarray(params["params"]["embedding"])[ids], atol=1e-7)  # fmt: skip
    text = compiler.compile_to_pphlo(lookup, (params, ids)).pphlo_text
    assert "pphlo.while" not in text and "gather" not in text
    res = simulator.mpc_execute(
        lookup, (params, ids), preset=protocols.preset("ABY3"), profile=True
    )
    np.testing.assert_allclose(res.outputs, np.asarray(params["params"]["embedding"])[ids], atol=1e-5)  # fmt: skip
    assert res.cost.max_rounds <= 3


@pytest.mark.parametrize("rows", [3, 40])  # 3 rows < D/2: one Gram matrix; 40: elementwise
def test_sum_of_squares_matches_plaintext_and_the_gram_path_sends_less(rows):
    import jax.numpy as jnp

    from secfwt_jax.compile import profiler
    from secfwt_jax.models.mpc_ops import sum_of_squares

    x = np.random.default_rng(rows).normal(size=(rows, 32)).astype(np.float32)
    expected = (x.astype(np.float64) ** 2).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(sum_of_squares(x)), expected, rtol=1e-5)
    preset = protocols.preset("ABY3")
    out = simulator.mpc_execute(sum_of_squares, (x,), preset=preset).outputs
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    ours = profiler.profile_function(sum_of_squares, (x,), (), preset).total_bytes
    elementwise = profiler.profile_function(
        lambda a: jnp.sum(a * a, axis=-1, keepdims=True), (x,), (), preset
    ).total_bytes
    if rows == 3:  # 9 Gram outputs against 96 truncated products
        assert ours < elementwise / 5
    else:
        assert ours == elementwise


def test_rms_norm_survives_massive_activations_under_spu():
    """An LLM's residual stream carries values of 16,000 (SmolLM2 from layer 6): squared they
    pass FM64's product range (2^27) and the plain sum of squares wraps; the wide sum does not."""
    from secfwt_jax.models.llama import rms_norm
    from secfwt_jax.models.mpc_ops import sum_of_squares

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, (3, 64)).astype(np.float32)
    x[2] *= 0.01  # row 0 ordinary, row 1 gets a massive activation, row 2 is small
    boost = np.ones_like(x)
    boost[1, 5] = 16400.0 / x[1, 5]  # made inside the program: inputs are bounded by 8192
    weight = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    plain = np.asarray(rms_norm(x * boost, weight, 1e-5))
    mpc = np.asarray(simulator.mpc_execute(lambda a, w: rms_norm(a * boost, w, 1e-5), (x, weight)).outputs)  # fmt: skip
    np.testing.assert_allclose(mpc, plain, atol=3e-3, rtol=3e-3)  # row 2: fixed point's precision
    naive = np.asarray(simulator.mpc_execute(lambda a: sum_of_squares(a * boost), (x,)).outputs)
    exact = np.sum((x[1] * boost[1]).astype(np.float64) ** 2)
    assert abs(naive[1, 0] - exact) > 0.01 * exact  # the hazard is real: the plain sum wraps
