"""LoRA on the top layers over a cached frozen trunk (`TrainableSpec("lora", cache_trunk=True)`)."""

import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier, cross_entropy
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import sets, spsa


def tiny(family="bert", layers=3):
    cfg = ModelConfig(
        family=family, vocab_size=40, hidden_size=16, num_layers=layers, num_heads=2,
        intermediate_size=32, max_positions=24, type_vocab_size=2 if family != "gpt2" else 0,
        pad_token_id=0, activation="gelu_new",
        attention=AttentionConfig(kind="rfa", num_features=8),
    )  # fmt: skip
    return Classifier(cfg, HeadConfig(num_labels=2, pooling="mean"))


def tiny_batch(seed=0, batch=6, seq=8, vocab=40):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.float32)
    mask[1, 5:] = 0
    return {
        "input_ids": rng.integers(1, vocab, (batch, seq)),
        "attention_mask": mask,
        "labels": np.eye(2, dtype=np.float32)[rng.integers(0, 2, batch)],
    }


def with_random_b(trainable, seed=1):
    """The factors with B drawn at random (B = 0 at init would hide a wrong wiring)."""
    rng = np.random.default_rng(seed)
    lora = {
        path: {"a": ab["a"], "b": rng.normal(0, 0.3, ab["b"].shape).astype(np.float32)}
        for path, ab in trainable["lora"].items()
    }
    return {**trainable, "lora": lora}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("top", [1, 2])
def test_only_top_layer_factors_exist_and_the_trunk_is_frozen(family, top):
    clf = tiny(family)
    params = clf.init(0)
    spec = sets.TrainableSpec("lora", lora_rank=2, top_layers=top, cache_trunk=True)
    problem = sets.build_problem(spec, clf, params)
    first = clf.config.num_layers - top
    factors = problem.trainable["lora"]
    per_layer = len(sets.LORA_TARGETS[family])
    assert len(factors) == per_layer * top
    assert sorted({sets.layer_index(p) for p in factors}) == list(
        range(first, clf.config.num_layers)
    )
    assert set(problem.trainable) == {"lora", clf.head_name}
    frozen = set(tu.flatten_dict(problem.frozen, sep="/"))
    assert frozen == set(tu.flatten_dict({clf.trunk_name: params[clf.trunk_name]}, sep="/"))
    for ab in factors.values():
        assert ab["a"].shape[1] == 2 and ab["b"].shape[0] == 2 and not np.any(ab["b"])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cached_logits_equal_the_uncached_lora_forward(family):
    clf = tiny(family)
    params = clf.init(0)
    batch = tiny_batch()
    spec = sets.TrainableSpec("lora", lora_rank=2, top_layers=1, cache_trunk=True)
    cached = sets.build_problem(spec, clf, params)
    every = sets.build_problem(sets.TrainableSpec("lora", lora_rank=2), clf, params)
    theta = with_random_b(cached.trainable)
    # The every-layer set with the same top factors and zero factors below is the same model.
    theta_every = dict(every.trainable)
    theta_every["lora"] = {
        path: theta["lora"].get(path, {"a": ab["a"], "b": np.zeros_like(ab["b"])})
        for path, ab in every.trainable["lora"].items()
    }
    prepared = cached.prepare(batch)
    got = cached.logits(theta, cached.frozen, prepared)
    want = every.logits(theta_every, every.frozen, batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ... and the factors do move the logits (B != 0 against B = 0).
    base = cached.logits(cached.trainable, cached.frozen, prepared)
    assert float(np.max(np.abs(np.asarray(got) - np.asarray(base)))) > 1e-3
    np.testing.assert_allclose(base, clf.logits(params, batch), rtol=1e-5, atol=1e-5)


def test_a_cached_spsa_step_equals_the_uncached_step():
    clf = tiny()
    params = clf.init(0)
    batch = tiny_batch()
    spec = sets.TrainableSpec("lora", lora_rank=1, top_layers=1, cache_trunk=True)
    cached = sets.build_problem(spec, clf, params)
    every = sets.build_problem(sets.TrainableSpec("lora", lora_rank=1), clf, params)
    top = set(cached.trainable["lora"])

    def every_logits(t, f, b):  # the top factors in the every-layer model, zeros below
        lora = {
            path: t["lora"].get(path, {"a": ab["a"], "b": np.zeros_like(ab["b"])})
            for path, ab in every.trainable["lora"].items()
        }
        return every.logits({**t, "lora": lora}, f, b)

    cfg = spsa.SpsaConfig(eps=1e-2, num_directions=2, directions="rademacher")
    z = spsa.directions(0, 0, cached.trainable, 2, "rademacher")
    loss = lambda logits_fn: lambda t, f, b: cross_entropy(logits_fn(t, f, b), b["labels"])  # noqa: E731
    new_c, info_c = spsa.spsa_step(loss(cached.logits), cached.trainable, cached.frozen, cached.prepare(batch), z, 0.1, cfg)  # fmt: skip
    new_u, info_u = spsa.spsa_step(loss(every_logits), cached.trainable, every.frozen, batch, z, 0.1, cfg)  # fmt: skip
    np.testing.assert_allclose(info_c["loss_plus"], info_u["loss_plus"], rtol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(new_c), jax.tree_util.tree_leaves(new_u), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(new_c["lora"]) == top


def test_zero_top_layers_trains_the_head_alone_on_the_whole_cached_trunk():
    clf = tiny()
    params = clf.init(0)
    batch = tiny_batch()
    spec = sets.TrainableSpec("lora", top_layers=0, cache_trunk=True)
    problem = sets.build_problem(spec, clf, params)
    assert problem.trainable["lora"] == {}
    prepared = problem.prepare(batch)
    np.testing.assert_allclose(
        problem.logits(problem.trainable, problem.frozen, prepared), clf.logits(params, batch),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_lora_without_cache_still_adapts_every_layer():
    clf = tiny()
    problem = sets.build_problem(sets.TrainableSpec("lora", lora_rank=2), clf, clf.init(0))
    assert len(problem.trainable["lora"]) == 2 * clf.config.num_layers
