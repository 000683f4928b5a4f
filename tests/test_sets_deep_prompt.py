"""A subspace prompt over a cached trunk (`TrainableSpec("prompt", cache_trunk=True)`): the
prompt p = A z enters at the first uncached layer, so a candidate re-runs the top layers."""

import jax
import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier, cross_entropy_loss, trunk_module
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import cmaes, sets, spsa

VOCAB = 40


def tiny(family: str, layers: int = 3) -> Classifier:
    llama = family == "llama"
    cfg = ModelConfig(
        family=family, vocab_size=VOCAB, hidden_size=16, num_layers=layers, num_heads=2,
        intermediate_size=32, max_positions=32, type_vocab_size=2 if family == "bert" else 0,
        pad_token_id=0, activation="silu" if llama else "gelu_new",
        num_kv_heads=1 if llama else None,
        attention=AttentionConfig(kind="softmax"),
    )  # fmt: skip
    head = HeadConfig(kind="lm", verbalizer_ids=(5, 9)) if llama else HeadConfig(num_labels=2, pooling="mean")  # fmt: skip
    return Classifier(cfg, head)


def tiny_batch(seed: int = 0, batch: int = 6, seq: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[1, 5:] = 0
    select = np.zeros((batch, seq), np.float32)
    select[np.arange(batch), mask.sum(1).astype(int) - 1] = 1  # the last real token
    labels = np.eye(2, dtype=np.float32)[np.arange(batch) % 2]
    return {"input_ids": rng.integers(1, VOCAB, (batch, seq)), "attention_mask": mask,
            "select": select, "labels": labels}  # fmt: skip


def prompt_spec(**kw) -> sets.TrainableSpec:
    return sets.TrainableSpec("prompt", prompt_length=3, intrinsic_dim=12, **kw)


def random_z(seed: int = 2) -> dict:
    return {"z": np.random.default_rng(seed).normal(0, 3.0, 12).astype(np.float32)}


def test_a_deep_prompt_below_every_layer_is_the_input_prompt():
    """With no layer cached, a Llama's prompt enters at layer 0 of the cached path (the
    embeddings computed by `prepare`, the prompt put before them by `upper_logits`) and
    must equal the input prompt of the whole-model path: same slots, same mask, same
    rotary positions, same scored position. (Elsewhere the input prompt also receives
    position embeddings (GPT-2) or the embedding LayerNorm (BERT), so a layer-0 deep
    prompt is a different prompt there; the next test holds those families.)"""
    clf = tiny("llama")
    params = clf.init(0)
    batch = tiny_batch()
    layers = clf.config.num_layers
    whole = sets.build_problem(prompt_spec(), clf, params)
    deep = sets.build_problem(prompt_spec(cache_trunk=True, top_layers=layers), clf, params)
    z = random_z()
    want = np.asarray(whole.logits(z, whole.frozen, batch))
    got = np.asarray(deep.logits(z, deep.frozen, deep.prepare(batch)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # ...and the prompt matters (a wiring that dropped it would pass the equality above
    # only if both paths dropped it).
    bare = np.asarray(deep.logits({"z": np.zeros(12, np.float32)}, deep.frozen, deep.prepare(batch)))  # fmt: skip
    assert np.max(np.abs(got - bare)) > 1e-3


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_deep_prompt_at_the_top_layer_moves_only_what_the_top_layer_computes(family):
    """At the top layer the prompt changes the scores, and the lower layers' output (the
    cache) does not depend on it: the cached path equals the whole model whose top layer
    reads the prompt's slots."""
    clf = tiny(family)
    params = clf.init(0)
    batch = tiny_batch()
    layers = clf.config.num_layers
    deep = sets.build_problem(prompt_spec(cache_trunk=True, top_layers=1), clf, params)
    prepared = deep.prepare(batch)
    lower, mask = clf.lower_hidden(params, batch, layers - 1)
    np.testing.assert_allclose(np.asarray(prepared["hidden"]), np.asarray(lower), atol=0)
    z = random_z()
    got = np.asarray(deep.logits(z, deep.frozen, prepared))
    # The reference: insert p = A z into the layer-(L-1) input and run the plain top layer
    # over every position, then read the head at the shifted scored position.
    projection = sets.prompt_projection(deep.spec, clf.config.hidden_size, float(np.std(np.asarray(clf.word_table(params)))))  # fmt: skip
    prompt = sets.subspace_prompt(z["z"], projection, 3)
    hidden, hmask = clf.insert_prompt(lower, mask, prompt)
    out, out_mask = trunk_module(clf.config).apply(
        {"params": params[clf.trunk_name]}, hidden, hmask, embed=False, first_layer=layers - 1
    )
    want = np.asarray(clf.scores(params, out, out_mask, batch, prompt_len=3))
    np.testing.assert_allclose(got, want, atol=1e-5)
    none = np.asarray(clf.upper_logits(params, prepared["hidden"], prepared["attention_mask"], batch, layers - 1))  # fmt: skip
    assert np.max(np.abs(got - none)) > 1e-3


def test_cma_es_and_spsa_lower_the_loss_of_a_deep_prompt():
    """Both forward-only searches move z so that the cached-trunk loss falls. (The tiny
    model's matrices are scaled up 8x: at init scale (std 0.02) no prompt moves its
    scores by more than a few hundredths. Measured: 0.724 -> 0.664 for CMA-ES and 0.680
    for SPSA; a prompt that never reached the top layer leaves 0.724.)"""
    clf = tiny("llama")
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) * (8.0 if a.ndim > 1 else 1.0), clf.init(0))  # fmt: skip
    problem = sets.build_problem(prompt_spec(cache_trunk=True, top_layers=1), clf, params)
    batch = problem.prepare(tiny_batch(batch=8))
    loss = cross_entropy_loss(problem.logits)
    start = float(loss(problem.trainable, problem.frozen, batch))

    population_loss = jax.jit(lambda pop: spsa.evaluate_population(loss, {"z": pop}, problem.frozen, batch))  # fmt: skip
    cma_cfg = cmaes.CmaConfig(population=8, sigma0=1.0, generations=30)
    result = cmaes.cma_search(lambda pop, _g: np.asarray(population_loss(pop)), 12, cma_cfg)
    after_cma = float(loss({"z": result.mean_z}, problem.frozen, batch))
    assert after_cma < start - 0.03, (start, after_cma)

    cfg = spsa.SpsaConfig(eps=1e-2, num_directions=4)
    step = jax.jit(lambda t, z: spsa.spsa_step(loss, t, problem.frozen, batch, z, 1.0, cfg)[0])
    theta = problem.trainable
    for i in range(40):
        theta = step(theta, spsa.directions(0, i, theta, 4))
    after_spsa = float(loss(theta, problem.frozen, batch))
    assert after_spsa < start - 0.02, (start, after_spsa)


def test_a_cached_prompt_needs_a_layer_above_it():
    with pytest.raises(ValueError, match="trainable.top_layers"):
        sets.TrainableSpec("prompt", cache_trunk=True, top_layers=0)
