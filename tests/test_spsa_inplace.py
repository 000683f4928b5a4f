"""MeZO's in-place SPSA step (a host sequence of donated jits): same step as
`spsa_step_seeded` up to float rounding, descends, honours its donation contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import loop, sets, spsa
from secfwt_jax.tuning.schedules import ScheduleConfig
from secfwt_jax.tuning.spsa_inplace import make_inplace_spsa_step

TARGET = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[3.0]], np.float32)}


def quadratic(t, f, batch):
    del f, batch
    return sum(jnp.sum((t[k] - TARGET[k]) ** 2) for k in TARGET)


def fresh(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(
        family="bert", vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
        intermediate_size=32, max_positions=24, type_vocab_size=2, pad_token_id=0,
        attention=AttentionConfig(kind="rfa", num_features=8),
    )  # fmt: skip
    clf = Classifier(cfg, HeadConfig(num_labels=2, pooling="mean"))
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1, 40, (4, 8)),
        "attention_mask": np.ones((4, 8), np.float32),
        "labels": np.eye(2, dtype=np.float32)[rng.integers(0, 2, 4)],
    }
    return clf, clf.init(0), batch


def assert_steps_agree(loss_fn, trainable, frozen, batch, cfg, key, step_size):
    """The in-place step against the jitted `spsa_step_seeded` from the same key."""
    seeded = jax.jit(lambda t, f, b, k: spsa.spsa_step_seeded(loss_fn, t, f, b, k, step_size, cfg))
    want, want_info = seeded(trainable, frozen, batch, key)
    step = make_inplace_spsa_step(loss_fn, cfg)  # every leaf here is below chunk_elements
    got, info = step(fresh(trainable), frozen, batch, key, step_size)
    # Not bitwise: (theta + eps z - 2 eps z) + eps z != theta in float32.
    for name in ("loss_plus", "loss_minus", "projected_grad"):
        np.testing.assert_allclose(info[name], want_info[name], rtol=1e-3, atol=1e-4)
    moved = jax.tree_util.tree_map(lambda a, b: np.max(np.abs(a - b)), trainable, want)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the step did move theta
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want
    )


def test_inplace_step_equals_the_seeded_step_for_one_direction(tiny_model):
    clf, params, batch = tiny_model
    problem = sets.build_problem(sets.TrainableSpec("bitfit"), clf, params)
    cfg = spsa.SpsaConfig(eps=1e-2, weight_decay=0.1)
    assert_steps_agree(
        loop.problem_loss(problem), problem.trainable, problem.frozen, batch, cfg,
        jax.random.PRNGKey(5), 0.5,
    )  # fmt: skip


def test_inplace_step_equals_the_seeded_step_for_several_directions():
    theta = {"w": np.ones(3, np.float32), "b": np.ones((1, 1), np.float32)}
    cfg = spsa.SpsaConfig(eps=1e-2, num_directions=3, weight_decay=0.1)
    assert_steps_agree(quadratic, theta, {}, {}, cfg, jax.random.PRNGKey(7), 0.05)


@pytest.mark.parametrize("chunk_elements", [None, 2])
def test_inplace_step_descends_a_quadratic(chunk_elements):
    step = make_inplace_spsa_step(
        quadratic, spsa.SpsaConfig(eps=1e-2, num_directions=2), chunk_elements
    )
    theta = {"w": jnp.zeros(3), "b": jnp.zeros((1, 1))}
    start = float(quadratic(theta, None, None))
    for i in range(150):
        theta, info = step(theta, {}, {}, jax.random.PRNGKey(i), 0.05)
    assert float(quadratic(theta, None, None)) < 0.01 * start
    assert info["loss_plus"].shape == (2,)


def test_chunked_directions_cover_every_entry_and_shift_back():
    # 1000 entries in blocks of 64: 16 blocks, the last one overlapping its predecessor.
    step = make_inplace_spsa_step(quadratic, spsa.SpsaConfig(), chunk_elements=64)
    key = jax.random.PRNGKey(3)
    z = np.asarray(step.shift({"x": jnp.zeros(1000)}, key, 0, 1.0)["x"])
    assert np.all(z != 0) and abs(z.mean()) < 0.15 and abs(z.std() - 1) < 0.1
    assert not np.allclose(z[:64], z[64:128]) and not np.allclose(z[-64:], z[-128:-64])
    back = step.shift({"x": jnp.asarray(z)}, key, 0, -1.0)["x"]
    np.testing.assert_allclose(back, 0.0, atol=1e-6)  # one ulp of z: fused-multiply rounding


def test_donation_invalidates_the_callers_arrays_and_returns_fresh_ones():
    step = make_inplace_spsa_step(quadratic, spsa.SpsaConfig(eps=1e-2))
    theta = {"w": jnp.zeros(3), "b": jnp.zeros((1, 1))}
    new, _ = step(theta, {}, {}, jax.random.PRNGKey(0), 0.1)
    # The contract: the input buffers were reused, so the caller must not read them.
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(theta))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(theta["w"])
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new))
    assert np.all(np.isfinite(np.asarray(new["w"])))
    # numpy inputs are copied to the device first and so survive the step.
    host = {"w": np.zeros(3, np.float32), "b": np.zeros((1, 1), np.float32)}
    step(host, {}, {}, jax.random.PRNGKey(0), 0.1)
    np.testing.assert_array_equal(host["w"], 0.0)


def test_inplace_config_is_validated_at_the_edge():
    with pytest.raises(ValueError, match="chunk_elements"):
        make_inplace_spsa_step(quadratic, spsa.SpsaConfig(), chunk_elements=0)
    with pytest.raises(TypeError, match="chunk_elements"):
        make_inplace_spsa_step(quadratic, spsa.SpsaConfig(), chunk_elements=True)
    with pytest.raises(TypeError, match="config"):
        make_inplace_spsa_step(quadratic, {"eps": 1e-3})


def test_train_spsa_memory_lean_follows_the_in_jit_trajectory(tiny_model):
    clf, params, batch = tiny_model
    problem = sets.build_problem(sets.TrainableSpec("head"), clf, params)
    before = jax.tree_util.tree_map(np.array, problem.trainable)
    runs = [
        loop.train_spsa(
            problem,
            batch,
            spsa.SpsaConfig(eps=1e-2, num_directions=2),
            ScheduleConfig("constant", peak=0.05, total_steps=5),
            steps=5,
            seed=1,
            in_jit_directions=True,
            memory_lean=lean,
        )  # fmt: skip
        for lean in (False, True)
    ]
    losses = [[h["loss"] for h in history] for _, history in runs]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    assert runs[1][1][-1]["forwards"] == 5 * 2 * 2
    # The problem's own trainable is copied, not donated.
    jax.tree_util.tree_map(np.testing.assert_array_equal, problem.trainable, before)
