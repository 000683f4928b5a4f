"""DP-SPSA (`tuning.privacy`): the clip, the noise scale and the update against a hand
computation, the Poisson sampler with its padding, and the accountant."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.tuning import privacy, spsa


def quadratic_per_example(t, f, b):
    """L_i(theta) = 0.5 * (x_i . w - y_i)^2: per-example losses [B] with a known gradient."""
    del f
    return 0.5 * (b["x"] @ t["w"] - b["y"]) ** 2


def test_the_step_clips_each_example_sums_adds_scaled_noise_and_divides_by_the_expected_batch():
    rng = np.random.default_rng(0)
    w = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(4, 3)).astype(np.float32) * np.array([[1.0], [1.0], [30.0], [1.0]], np.float32)  # fmt: skip
    y = rng.normal(size=4).astype(np.float32)
    included = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
    z = {"w": np.array([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]], np.float32)}  # K = 2
    noise = np.array([0.5, -2.0], np.float32)
    cfg = spsa.SpsaConfig(eps=1e-3, num_directions=2, directions="rademacher")
    clip, sigma, expected_batch, lr = 1.0, 0.7, 3.0, 0.1
    batch = {"x": x, "y": y, "included": included}
    new, info = privacy.dp_spsa_step(
        quadratic_per_example, {"w": w}, {}, batch, z, noise, lr, cfg, clip, sigma, expected_batch
    )
    # By hand, in float64: the exact directional derivatives (eps is small against the
    # quadratic's curvature), clipped per example to [-1, 1], padding dropped.
    residual = x.astype(np.float64) @ w - y
    grads = np.stack([residual * (x @ zk) for zk in z["w"]])  # [K, B]
    assert np.abs(grads[:, 2]).max() > clip  # row 2 is scaled up: its clip binds
    clipped = np.clip(grads, -clip, clip) * included
    g = (clipped.sum(axis=1) + sigma * clip * noise) / expected_batch
    want = w - lr / 2 * (g[0] * z["w"][0] + g[1] * z["w"][1])
    np.testing.assert_allclose(np.asarray(info["grad"]), g, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(new["w"]), want, rtol=1e-3, atol=1e-4)
    got = privacy.per_example_projected_gradients(quadratic_per_example, {"w": w}, {}, batch, z, cfg)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), grads, rtol=2e-3, atol=2e-3)


def test_noise_scale_is_sigma_times_clip_over_the_expected_batch():
    """With every row padding, the noisy gradient is the noise alone: sigma C n / b."""
    grads = jnp.asarray(np.full((3, 5), 9.0, np.float32))
    noise = jnp.asarray(np.array([1.0, -0.5, 2.0], np.float32))
    got = privacy.noisy_gradient(grads, jnp.zeros(5), noise, clip=0.5, noise_multiplier=2.0, expected_batch=4.0)  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), 2.0 * 0.5 * np.asarray(noise) / 4.0, rtol=1e-6)
    every = privacy.noisy_gradient(grads, jnp.ones(5), jnp.zeros(3), clip=0.5, noise_multiplier=2.0, expected_batch=4.0)  # fmt: skip
    np.testing.assert_allclose(np.asarray(every), np.full(3, 5 * 0.5 / 4.0), rtol=1e-6)


def test_the_poisson_sampler_pads_truncates_and_draws_at_its_rate():
    rng = np.random.default_rng(3)
    sizes = []
    for _ in range(400):
        index, included = privacy.poisson_batch(rng, 1000, 0.02, 40)
        drawn = index[included == 1]
        assert len(set(drawn)) == len(drawn) and np.all(np.diff(drawn) > 0)
        assert np.all(index[included == 0] == 0)
        sizes.append(included.sum())
    assert abs(np.mean(sizes) - 20) < 1.0  # E = n q = 20
    index, included = privacy.poisson_batch(np.random.default_rng(0), 100, 0.9, 10)
    assert included.sum() == 10  # ~90 drawn, truncated to a random 10


def test_padding_keeps_the_overflow_term_under_a_tenth_of_delta():
    n, q, steps, delta, eps = 2000, 16 / 2000, 500, 2000**-1.1, 8.0
    rows = privacy.padded_rows(n, q, steps, delta, eps)
    assert privacy.overflow_delta(n, q, rows, steps, eps) <= delta / 10
    assert privacy.overflow_delta(n, q, rows - 1, steps, eps) > delta / 10
    assert 16 < rows < 64


def test_the_accountant_composes_subsampled_gaussians():
    q, steps, delta = 0.01, 1000, 1e-5
    low, high = privacy.epsilon_spent(2.0, q, steps, delta), privacy.epsilon_spent(1.0, q, steps, delta)  # fmt: skip
    assert 0 < low < high  # more noise, less epsilon
    assert privacy.epsilon_spent(1.0, q, 2 * steps, delta) > high  # more steps, more epsilon
    assert privacy.epsilon_spent(1.0, q, 0, delta) == 0.0
    # K directions: the sensitivity is C sqrt(K), so sigma acts as sigma / sqrt(K).
    assert privacy.epsilon_spent(2.0, q, steps, delta, directions=4) == pytest.approx(high)
    # One unsampled step is the Gaussian mechanism: the accountant must be no looser than
    # the classical bound sigma = sqrt(2 ln(1.25 / delta)) / epsilon (valid for epsilon < 1).
    sigma = 6.0
    classical = math.sqrt(2 * math.log(1.25 / delta)) / sigma
    assert privacy.epsilon_spent(sigma, 1.0, 1, delta) <= classical
    # Calibration inverts it.
    found = privacy.noise_multiplier_for(2.0, delta, q, steps)
    assert privacy.epsilon_spent(found, q, steps, delta) == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": 0.0, "epsilon": 1.0}, "privacy.clip: must be positive"),
        ({}, "privacy: give exactly one of epsilon and noise_multiplier"),
        ({"epsilon": 1.0, "noise_multiplier": 1.0}, "privacy: give exactly one"),
        ({"epsilon": -1.0}, "privacy.epsilon: must be positive"),
        ({"noise_multiplier": 1.0, "delta": 1.5}, "privacy.delta: must lie in"),
        ({"epsilon": 1.0, "sampling": "shuffle"}, "privacy.sampling: only 'poisson'"),
    ],
)
def test_bad_privacy_settings_get_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        privacy.PrivacyConfig(**kwargs)
