"""Plaintext training loops: each one lowers the training loss on a tiny model; the linear
probe fits separable data."""

import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import cmaes, loop, sets, spsa
from secfwt_jax.tuning.schedules import ScheduleConfig


def tiny(attention=None):
    cfg = ModelConfig(
        family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
        intermediate_size=32, max_positions=24, type_vocab_size=2, pad_token_id=0,
        attention=attention or AttentionConfig(kind="rfa", num_features=8),
    )  # fmt: skip
    return Classifier(cfg, HeadConfig(num_labels=2, pooling="mean"))


def learnable_batch(rows=16, seq=8, seed=0):
    """Label = whether token 3 occurs: learnable from mean-pooled features."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 40, (rows, seq))
    labels = np.arange(rows) % 2
    ids[labels == 1, 2] = 3
    mask = np.ones((rows, seq), np.float32)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": np.eye(2, dtype=np.float32)[labels]}


@pytest.fixture(scope="module")
def model():
    clf = tiny()
    return clf, clf.init(0)


def initial_loss(problem, batch):
    return loop.evaluate(problem, problem.trainable, batch)["loss"]


@pytest.mark.parametrize("in_jit", [False, True])
def test_train_spsa_lowers_training_loss_on_cached_top_layer(model, in_jit):
    clf, params = model
    spec = sets.TrainableSpec("top", top_layers=1, cache_trunk=True)
    problem = sets.build_problem(spec, clf, params)
    batch = loop.prepare_batch(problem, learnable_batch())
    assert "hidden" in batch  # the frozen lower layer ran once, here
    # (peak 0.1 made the loss oscillate between 0.5 and 1.3: pass or fail by chance. 150
    # steps sat at the bar: 0.80x and 0.92x of the start after the query, key and value
    # projections became one matmul (float32 rounding alone), 0.66x and 0.50x before; 300
    # steps reach 0.25x (host directions) and 0.41x (in jit), 2026-12-07)
    trainable, history = loop.train_spsa(
        problem, batch, spsa.SpsaConfig(eps=1e-3, num_directions=4),
        ScheduleConfig("linear", peak=0.05, total_steps=300), steps=300, seed=0,
        in_jit_directions=in_jit,
    )  # fmt: skip
    assert history[-1]["forwards"] == 300 * 2 * 4
    assert loop.evaluate(problem, trainable, batch)["loss"] < 0.75 * initial_loss(problem, batch)


def test_train_spsa_host_directions_are_reproducible(model):
    clf, params = model
    problem = sets.build_problem(sets.TrainableSpec("head"), clf, params)
    batch, cfg = learnable_batch(), spsa.SpsaConfig(num_directions=2)
    runs = [
        loop.train_spsa(problem, batch, cfg, ScheduleConfig(peak=0.1), steps=3, seed=5)[0]
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0]["classifier"]["kernel"], runs[1]["classifier"]["kernel"])


def test_train_backprop_lowers_training_loss_and_evaluates_periodically(model):
    clf, params = model
    problem = sets.build_problem(sets.TrainableSpec("bitfit"), clf, params)
    batch = learnable_batch()
    eval_fn = lambda t: loop.evaluate(problem, t, batch)  # noqa: E731
    trainable, history = loop.train_backprop(
        problem, loop.cycle_minibatches(batch, 8, seed=0), "adam",
        ScheduleConfig(peak=0.01, total_steps=200), steps=200, eval_fn=eval_fn, eval_every=100,
    )  # fmt: skip
    # (step size 0.01: at 0.05 this tiny RFA model's loss after 80 steps swung between 0.07x
    # and 0.6x of the start with float32 rounding changes alone. With the 128-bit init key
    # of 2026-12-04, 100 steps ended at 0.516x on this host, at the bar, and passed or
    # failed by machine; 200 steps reach 0.05x, 300 steps 0.008x.)
    assert [h["step"] for h in history if "eval" in h] == [0, 100, 199]
    assert history[-1]["forwards"] == 200 * loop.BACKPROP_FORWARD_EQUIVALENTS
    assert loop.evaluate(problem, trainable, batch)["loss"] < 0.5 * initial_loss(problem, batch)


def test_train_cma_prompt_lowers_training_loss(model):
    clf, params = model
    rng = np.random.default_rng(1)
    params = {**params, "classifier": {"kernel": rng.normal(0, 1, (16, 2)).astype(np.float32),
                                       "bias": np.zeros(2, np.float32)}}  # fmt: skip
    spec = sets.TrainableSpec("prompt", prompt_length=2, intrinsic_dim=8)
    problem = sets.build_problem(spec, clf, params)
    batch = learnable_batch()
    cfg = cmaes.CmaConfig(population=8, sigma0=5.0, generations=12, seed=0)
    trainable, history = loop.train_cma_prompt(problem, batch, cfg)
    assert history[-1]["forwards"] == 8 * 12
    assert loop.evaluate(problem, trainable, batch)["loss"] < initial_loss(problem, batch) - 0.01


def test_linear_probe_fits_separable_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    direction = rng.normal(size=12)
    feats = rng.normal(size=(64, 12)) + np.outer(2 * labels - 1, direction)
    head = loop.linear_probe(feats, np.eye(2)[labels], steps=200)
    predictions = np.argmax(feats @ head["kernel"] + head["bias"], -1)
    assert head["kernel"].shape == (12, 2) and np.mean(predictions == labels) == 1.0


def test_pooled_features_match_the_linear_head_path(model):
    clf, params = model
    batch = learnable_batch()
    feats = loop.pooled_features(clf, params, batch, chunk=5)
    head = params["classifier"]
    np.testing.assert_allclose(
        feats @ head["kernel"] + head["bias"], np.asarray(clf.logits(params, batch)), atol=1e-5
    )


def test_cycle_minibatches_reshuffles_each_epoch_with_fixed_shape():
    batch = {"x": np.arange(10)}
    at = loop.cycle_minibatches(batch, 4, seed=0)
    epoch0 = np.concatenate([at(0)["x"], at(1)["x"]])
    epoch1 = np.concatenate([at(2)["x"], at(3)["x"]])
    assert all(at(s)["x"].shape == (4,) for s in range(6))
    assert len(set(epoch0)) == 8 and not np.array_equal(epoch0, epoch1)
