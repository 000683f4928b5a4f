"""DP-SGD (Abadi et al. 2016) on the same trainable set and sampler as DP-SPSA: the
backprop baseline a private forward-only run is measured against.

    g_i    = grad_theta L(theta; x_i)                                   per example
    s      = sum_i w_i g_i min(1, C / ||g_i||_2) + sigma C n,  n ~ N(0, I)
    theta <- theta - eta s / b

w_i marks the rows the Poisson sampler drew (0 for padding) and b is the EXPECTED batch
q n, as in `privacy.dp_spsa_step`. Adding or removing one row moves s by at most C in L2,
so one step is a Gaussian mechanism of multiplier sigma, and a run composes `steps`
Poisson-subsampled ones: `privacy.epsilon_spent(sigma, q, steps, delta, directions=1)`.

It needs a backward pass per example (the cost SecFwT removes under MPC), so it is a
plaintext baseline here; `backprop.backprop_step` is the compiled SFT row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from secfwt_jax.tuning.privacy import sampled_batch
from secfwt_jax.tuning.spsa import LossFn, PyTree


def clipped_gradient_sum(per_example_loss: LossFn, trainable: PyTree, frozen: PyTree, batch: dict, clip: float):  # fmt: skip
    """sum_i w_i g_i min(1, C / ||g_i||): the flat [P] sum and each row's norm [B] before
    the clip. `batch["included"]` [B] holds w."""
    flat, unravel = ravel_pytree(trainable)

    def one(row):
        single = jax.tree_util.tree_map(lambda v: v[None], row)
        loss = lambda f: per_example_loss(unravel(f), frozen, single)[0]  # noqa: E731
        return jax.grad(loss)(flat)

    rows = {k: v for k, v in batch.items() if k != "included"}
    grads = jax.vmap(one)(rows)  # [B, P]
    norms = jnp.sqrt(jnp.sum(grads * grads, axis=1))
    scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12)) * batch["included"]
    return jnp.sum(grads * scale[:, None], axis=0), norms


def dp_sgd_step(
    per_example_loss: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    noise,
    step_size,
    clip: float,
    noise_multiplier: float,
    expected_batch: float,
) -> tuple[PyTree, dict]:
    """One private SGD step; `noise` [P] is N(0, 1) over the flat trainable parameters.
    Returns (new trainable, {grad: the noisy flat gradient, clipped: rows whose norm was
    over C})."""
    flat, unravel = ravel_pytree(trainable)
    total, norms = clipped_gradient_sum(per_example_loss, trainable, frozen, batch, clip)
    grad = (total + (noise_multiplier * clip) * noise) * (1.0 / expected_batch)
    clipped = jnp.sum((norms > clip) * batch["included"])
    return unravel(flat - step_size * grad), {"grad": grad, "clipped": clipped}


def dp_sgd_train(
    per_example_loss: LossFn,
    theta: PyTree,
    frozen: PyTree,
    rows: dict,
    *,
    steps: int,
    rate: float,
    max_rows: int,
    clip: float,
    noise_multiplier: float,
    step_size: float,
    private_seed: int,
) -> PyTree:
    """Plaintext DP-SGD over `rows` ({name: [n, ...]}) with the private run's sampler: a
    Poisson batch padded to `max_rows` and the noise from `private_seed`
    (`audit.dp_spsa_train` is its forward-only twin). noise_multiplier 0 is the clipped
    run without noise."""
    num_rows = len(next(iter(rows.values())))
    size = ravel_pytree(theta)[0].size
    step = jax.jit(
        lambda t, b, n: dp_sgd_step(
            per_example_loss, t, frozen, b, n, step_size, clip, noise_multiplier, rate * num_rows
        )[0]
    )
    rng = np.random.default_rng([private_seed, 31])
    for _ in range(steps):
        batch = sampled_batch(rng, rows, rate, max_rows)
        theta = step(theta, batch, rng.standard_normal(size).astype(np.float32))
    return theta


__all__ = ["clipped_gradient_sum", "dp_sgd_step", "dp_sgd_train"]
