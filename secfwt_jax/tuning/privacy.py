"""Differential privacy for forward-only tuning: DP-ZO's mechanism (Tang et al. 2024), the
sampling it is accounted under, and the accountant (Google's `dp-accounting`).

The only data-dependent quantity in an SPSA update is one scalar per direction, the
projected gradient. A private step makes it per example, bounds it, and noises the sum:

    g_ki   = (L(theta + eps z_k; x_i) - L(theta - eps z_k; x_i)) / 2 eps    [K, B]
    s_k    = sum_i w_i clip(g_ki, -C, C) + sigma C n_k,   n_k ~ N(0, 1)        [K]
    theta <- theta - eta / K sum_k (s_k / b) z_k

w_i in {0, 1} marks the rows the sampler drew (a padded batch carries w_i = 0 rows) and b
is the EXPECTED batch size q n, public; dividing by the drawn count would leak it.

Sensitivity: adding or removing one example moves s (in R^K) by a vector whose entries
each lie in [-C, C], so by at most C sqrt(K) in L2. Noise sigma C per coordinate is then a
Gaussian mechanism of noise multiplier sigma / sqrt(K) on that sensitivity: the accountant
composes `steps` Poisson-subsampled Gaussian mechanisms at sigma / sqrt(K). (K = 1, DP-ZO's
setting, costs nothing; K directions buy a lower-variance gradient with sqrt(K) more noise
per direction for the same guarantee.)

Sampling: Poisson, each training row joins a step's batch with probability q,
independently (what amplification by subsampling assumes). The batch is padded to a
public `max_rows`; a draw larger than that keeps a uniformly random `max_rows` of it. The
truncated sampler differs from the Poisson one only on the event that some step overflows,
of probability at most steps * P(Binomial(n, q) > max_rows) = eta, so the run is
(epsilon, delta + eta (1 + e^epsilon))-DP (`overflow_delta`); `padded_rows` picks the
smallest `max_rows` that keeps that term under a tenth of delta.

Who draws what (under MPC): the directions z are public (the run seed), the sample and the
noise n are the data owner's, from its own private randomness, and enter the program as
secrets. The model owner, who receives theta, never sees n.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np

from secfwt_jax.tuning.spsa import (
    DEFAULT_SPSA,
    LossFn,
    PyTree,
    SpsaConfig,
    apply_projected_gradient,
    evaluate_population,
    perturbed_pair,
)

Sampling = Literal["poisson"]


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """`tuning.privacy`: the clip C and either a target `epsilon` (the noise multiplier is
    derived) or a `noise_multiplier` sigma (epsilon is reported); `delta` defaults to
    1 / n^1.1 of the training rows; `batch_size` is the expected Poisson batch q n."""

    clip: float = 1.0
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    sampling: Sampling = "poisson"

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"privacy.clip: must be positive, got {self.clip}")
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("privacy: give exactly one of epsilon and noise_multiplier")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"privacy.epsilon: must be positive, got {self.epsilon}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"privacy.noise_multiplier: must be positive, got {self.noise_multiplier}")  # fmt: skip
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta: must lie in (0, 1), got {self.delta}")
        if self.sampling != "poisson":
            raise ValueError(f"privacy.sampling: only 'poisson' is accounted, got {self.sampling!r}")  # fmt: skip


def default_delta(num_rows: int) -> float:
    """1 / n^1.1: below 1/n, as a meaningful delta must be."""
    return float(num_rows) ** -1.1


# ------------------------------------------------------------------------------ the mechanism
def _perturbed_losses(per_example_loss, trainable, frozen, batch, z, config) -> jnp.ndarray:
    """Each row's loss at theta + eps z_k (first K) and theta - eps z_k (last K): [2K, B],
    as one vmapped forward (as in `spsa.spsa_step`)."""
    pair = perturbed_pair(trainable, z, config.eps, config.directions)
    return evaluate_population(per_example_loss, pair, frozen, batch, config.batched)


def per_example_projected_gradients(
    per_example_loss: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    z: PyTree,
    config: SpsaConfig = DEFAULT_SPSA,
) -> jnp.ndarray:
    """g [K, B]: each row's loss difference along each direction over 2 eps."""
    losses = _perturbed_losses(per_example_loss, trainable, frozen, batch, z, config)
    return _projected(losses, config.eps)


def _projected(losses, eps: float) -> jnp.ndarray:
    """[2K, B] losses at theta +- eps z -> the projected gradients [K, B]."""
    k = losses.shape[0] // 2
    return (losses[:k] - losses[k:]) * (1.0 / (2.0 * eps))


def noisy_gradient(
    grads, included, noise, clip: float, noise_multiplier: float, expected_batch: float
) -> jnp.ndarray:
    """(sum_i w_i clip(g_ki, -C, C) + sigma C n_k) / b: [K]. Under MPC the clip is two
    comparisons per (direction, row), and the public scales fold into one product."""
    clipped = jnp.clip(grads, -clip, clip) * included[None, :]
    total = jnp.sum(clipped, axis=1) + (noise_multiplier * clip) * noise
    return total * (1.0 / expected_batch)


def dp_spsa_step(
    per_example_loss: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    z: PyTree,
    noise,
    step_size,
    config: SpsaConfig,
    clip: float,
    noise_multiplier: float,
    expected_batch: float,
) -> tuple[PyTree, dict]:
    """One private SPSA step. `batch["included"]` [B] marks the sampled rows (0 for
    padding), `noise` [K] is N(0, 1) from the data owner. Returns (new trainable, info)
    with info = {loss: the included rows' mean loss at theta +- eps z, grad: the noisy [K]}.
    """
    included = batch["included"]
    losses = _perturbed_losses(per_example_loss, trainable, frozen, batch, z, config)
    g = noisy_gradient(
        _projected(losses, config.eps), included, noise, clip, noise_multiplier, expected_batch
    )
    rows = jnp.maximum(jnp.sum(included), 1.0)
    loss = jnp.sum(jnp.mean(losses, axis=0) * included) / rows
    return apply_projected_gradient(trainable, z, g, step_size, config), {"loss": loss, "grad": g}


# ------------------------------------------------------------------------------- the sampler
def overflow_probability(num_rows: int, rate: float, max_rows: int) -> float:
    """P(Binomial(n, q) > max_rows): one step's chance of drawing more rows than fit."""
    from scipy.stats import binom

    return float(binom.sf(max_rows, num_rows, rate))


def padded_rows(num_rows: int, rate: float, steps: int, delta: float, epsilon: float) -> int:
    """The smallest public batch size whose `overflow_delta` stays under delta / 10."""
    size = max(1, math.ceil(num_rows * rate))
    while size < num_rows and overflow_delta(num_rows, rate, size, steps, epsilon) > delta / 10:
        size += 1
    return size


def overflow_delta(num_rows: int, rate: float, max_rows: int, steps: int, epsilon: float) -> float:
    """What truncating at `max_rows` adds to delta: steps P(overflow) (1 + e^epsilon)."""
    return steps * overflow_probability(num_rows, rate, max_rows) * (1.0 + math.exp(epsilon))


def poisson_batch(
    rng: np.random.Generator, num_rows: int, rate: float, max_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices [max_rows], included [max_rows] in {0, 1}): each row joins with
    probability `rate`; the batch is padded with row 0 at weight 0, or truncated to a
    uniformly random `max_rows` of the draw. The data owner calls it with its PRIVATE rng."""
    drawn = np.flatnonzero(rng.random(num_rows) < rate)
    if len(drawn) > max_rows:
        drawn = np.sort(rng.choice(drawn, max_rows, replace=False))
    index = np.zeros(max_rows, np.int64)
    included = np.zeros(max_rows, np.float32)
    index[: len(drawn)], included[: len(drawn)] = drawn, 1.0
    return index, included


def sampled_batch(rng: np.random.Generator, rows: dict, rate: float, max_rows: int) -> dict:
    """One step's Poisson batch of `rows` ({name: [n, ...]}), gathered and padded to
    `max_rows`, with its `included` marks (`poisson_batch`): what a plaintext private run
    feeds its step."""
    num_rows = len(next(iter(rows.values())))
    index, included = poisson_batch(rng, num_rows, rate, max_rows)
    return {name: value[index] for name, value in rows.items()} | {"included": included}


def noise_draw(rng: np.random.Generator, num_directions: int) -> np.ndarray:
    """n [K] ~ N(0, 1) for one step, from the data owner's PRIVATE rng."""
    return rng.standard_normal(num_directions).astype(np.float32)


# ---------------------------------------------------------------------------- the accountant
def _event(noise_multiplier: float, rate: float, steps: int, directions: int):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / math.sqrt(directions))
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(rate, gaussian), steps)  # fmt: skip


#: Renyi orders from 2: dp-accounting's default list also holds 1.1-1.9, whose series
#: fails to converge at large sampling rates (the tiny runs' q = 0.5) and is dropped then
#: with a warning per order; those orders only tighten epsilon for epsilon >> 10.
RDP_ORDERS = tuple([2 + i / 4 for i in range(40)] + list(range(12, 65)) + [128, 256, 512])


def _accountant():
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(list(RDP_ORDERS))


def epsilon_spent(noise_multiplier: float, rate: float, steps: int, delta: float, directions: int = 1) -> float:  # fmt: skip
    """epsilon at `delta` after `steps` Poisson-sampled private steps (RDP accountant)."""
    if steps == 0:
        return 0.0
    accountant = _accountant()
    accountant.compose(_event(noise_multiplier, rate, steps, directions))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, rate: float, steps: int, directions: int = 1) -> float:  # fmt: skip
    """The smallest sigma whose run spends at most `epsilon` at `delta`."""
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda sigma: _event(sigma, rate, steps, directions),
            epsilon,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-2, 1.0),
        )
    )


__all__ = [
    "PrivacyConfig",
    "default_delta",
    "dp_spsa_step",
    "epsilon_spent",
    "noise_draw",
    "noise_multiplier_for",
    "noisy_gradient",
    "overflow_delta",
    "overflow_probability",
    "padded_rows",
    "per_example_projected_gradients",
    "poisson_batch",
    "sampled_batch",
]
