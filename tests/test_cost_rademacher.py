"""Rademacher SPSA directions: +-1 z, the same step as the product form, and a free update
under MPC (selects on the public sign instead of one truncation per parameter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import profiler, protocols
from secfwt_jax.compile.profile_cases import spsa_update
from secfwt_jax.compile.simulator import mpc_execute
from secfwt_jax.tuning import spsa

TARGET = {"w": np.array([1.0, -2.0, 0.5, 4.0], np.float32), "b": np.array([[3.0]], np.float32)}
RADEMACHER = spsa.SpsaConfig(eps=1e-2, num_directions=3, weight_decay=0.1, directions="rademacher")


def quadratic(t, f, batch):
    del f, batch
    return sum(jnp.sum((t[k] - TARGET[k]) ** 2) for k in TARGET)


def test_rademacher_directions_are_signs_deterministic_in_seed_and_step():
    like = {"w": np.zeros((50, 40), np.float32)}
    z = spsa.directions(7, 3, like, 2, kind="rademacher")["w"]
    assert z.shape == (2, 50, 40) and z.dtype == np.float32
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 0.05  # 4,000 fair signs
    np.testing.assert_array_equal(z, spsa.directions(7, 3, like, 2, kind="rademacher")["w"])
    assert not np.array_equal(z, spsa.directions(7, 4, like, 2, kind="rademacher")["w"])


def test_unknown_direction_kinds_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="^spsa.directions: unknown 'uniform'"):
        spsa.SpsaConfig(directions="uniform")
    with pytest.raises(ValueError, match="^spsa.directions: unknown 'uniform'"):
        spsa.directions(0, 0, {"w": np.zeros(2)}, kind="uniform")


def test_rademacher_step_equals_the_product_formula_with_plus_minus_one_z():
    theta = {"w": np.ones(4, np.float32), "b": np.ones((1, 1), np.float32)}
    z = spsa.directions(0, 5, theta, 3, kind="rademacher")
    new, info = spsa.spsa_step(quadratic, theta, {}, {}, z, 0.05, RADEMACHER)
    # The Gaussian code path (products) on the same +-1 z is the reference.
    ref, ref_info = spsa.spsa_step(quadratic, theta, {}, {}, z, 0.05, spsa.SpsaConfig(
        eps=1e-2, num_directions=3, weight_decay=0.1))  # fmt: skip
    np.testing.assert_allclose(info["loss_plus"], ref_info["loss_plus"], rtol=1e-6)
    np.testing.assert_allclose(info["loss_minus"], ref_info["loss_minus"], rtol=1e-6)
    for k in theta:
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-6, atol=1e-7)
        assert not np.allclose(new[k], theta[k])


def test_rademacher_step_reads_only_the_sign_of_z():
    theta = {"w": np.zeros(4, np.float32), "b": np.zeros((1, 1), np.float32)}
    z = spsa.directions(1, 0, theta, 3)  # Gaussian
    signs = jax.tree_util.tree_map(np.sign, z)
    a, _ = spsa.spsa_step(quadratic, theta, {}, {}, z, 0.05, RADEMACHER)
    b, _ = spsa.spsa_step(quadratic, theta, {}, {}, signs, 0.05, RADEMACHER)
    for k in theta:
        np.testing.assert_array_equal(a[k], b[k])


def test_seeded_rademacher_step_descends_a_quadratic():
    theta = {"w": np.zeros(4, np.float32), "b": np.zeros((1, 1), np.float32)}
    cfg = spsa.SpsaConfig(eps=1e-2, num_directions=2, directions="rademacher")
    step = jax.jit(lambda t, key: spsa.spsa_step_seeded(quadratic, t, {}, {}, key, 0.02, cfg))
    start = float(quadratic(theta, None, None))
    for i in range(200):
        theta, _ = step(theta, jax.random.PRNGKey(i))
    assert float(quadratic(theta, None, None)) < 0.05 * start


def test_rademacher_update_is_free_under_aby3_and_matches_plaintext():
    """0 bytes per parameter (only the [K] scalar coefficients are truncated) against
    64 bytes per parameter with Gaussian z; the MPC result equals plaintext."""
    rng = np.random.default_rng(0)
    theta = {"w": rng.normal(0, 1, (64, 48)).astype(np.float32)}
    loss_pm, lr = rng.normal(0, 1, (2,)).astype(np.float32), np.float32(1e-3)
    preset, n = protocols.preset("ABY3"), theta["w"].size
    cost = {}
    for kind in ("gaussian", "rademacher"):
        z = spsa.directions(0, 0, theta, 1, kind)
        fn = lambda t, zz, lpm, eta, kind=kind: spsa_update(t, zz, lpm, eta, 1e-2, 0.0, kind)  # noqa: E731
        args = (theta, z, loss_pm, lr)
        cost[kind] = profiler.profile_function(fn, args, (1, 3), preset, name=kind).total_bytes
        if kind == "rademacher":
            got = mpc_execute(fn, args, (1, 3), preset).outputs
            want = jax.jit(fn)(*args)
            for g, w in zip(
                jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
            ):
                np.testing.assert_allclose(g, w, atol=1e-4)
    assert cost["gaussian"] >= 64 * n
    assert cost["rademacher"] <= 64  # one truncation of the K = 1 coefficient
