"""A private run (`tuning.privacy`): its public plan, the private SPSA step program, and the
data owner's per-step draws.

    plan = privacy_plan(spec, num_rows)          public: rate, sigma, padded size, epsilon
    step = private_step_fn(...)                  (theta, frozen, *chunks, *labels, pick,
                                                  included, z, noise, lr) -> (theta', loss)
    pick, included, noise = data_owner_draws(seed, step, plan, total_rows)   at the data owner

Each step the data owner draws a Poisson sample of the training rows and the noise from
its own private seed (never the public run seed) and enters them as secrets: `pick`
[max_rows, total_rows] one-hot rows, `included` [max_rows] (0 for padding) and `noise`
[K] ~ N(0, 1). Inside MPC the step gathers the sampled rows of the cached features
(`pick` times every chunk's rows, a secret product whose communication is the gathered
rows', not the data set's), clips each row's projected gradient and adds sigma C noise
(`tuning.privacy.dp_spsa_step`). The compute parties see none of the three; the model
owner, who receives theta, learns neither the sample nor the noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.classifier import per_example_loss
from secfwt_jax.run.spec import RunSpec
from secfwt_jax.tuning import privacy


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """The public facts of a private run, fixed before it starts."""

    clip: float
    noise_multiplier: float
    delta: float
    rate: float  # q: each training row joins a step's sample with this probability
    expected_batch: float  # q n: what the noisy sum is divided by
    max_rows: int  # the public padded batch size
    num_rows: int  # n: the rows sampled from
    steps: int
    directions: int
    epsilon: float  # after every step, at delta (the Poisson mechanism)
    overflow_delta: float  # what truncating a draw at max_rows adds to delta

    def epsilon_after(self, steps: int) -> float:
        """epsilon at `delta` after the first `steps` steps."""
        return privacy.epsilon_spent(self.noise_multiplier, self.rate, steps, self.delta, self.directions)  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """The report's privacy section: the guarantee is (epsilon, delta + overflow_delta)."""
        return dataclasses.asdict(self) | {"total_delta": self.delta + self.overflow_delta}


def privacy_plan(spec: RunSpec, num_rows: int) -> PrivacyPlan | None:
    """The plan from the spec and the public row count (None when the run is not private).
    A target epsilon calibrates sigma; a given sigma reports its epsilon."""
    p = spec.tuning.privacy
    if p is None:
        return None
    t = spec.tuning
    k = t.spsa.num_directions
    rate = min(1.0, t.batch_size / num_rows)
    delta = p.delta if p.delta is not None else privacy.default_delta(num_rows)
    sigma = p.noise_multiplier
    if sigma is None:
        sigma = privacy.noise_multiplier_for(p.epsilon, delta, rate, t.steps, k)
    epsilon = privacy.epsilon_spent(sigma, rate, t.steps, delta, k)
    rows = privacy.padded_rows(num_rows, rate, t.steps, delta, epsilon)
    return PrivacyPlan(
        clip=p.clip, noise_multiplier=float(sigma), delta=float(delta), rate=rate,
        expected_batch=rate * num_rows, max_rows=rows, num_rows=num_rows, steps=t.steps,
        directions=k, epsilon=epsilon,
        overflow_delta=privacy.overflow_delta(num_rows, rate, rows, t.steps, epsilon),
    )  # fmt: skip


def gather_rows(pick, chunks):
    """pick [R, n] one-hot (secret) times the rows of every chunk stacked: [R, ...] per leaf.
    `chunks` is a tuple of same-shaped trees [B, ...]; n = len(chunks) * B."""
    import jax

    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, axis=0), *chunks)
    return jax.tree_util.tree_map(lambda a: jnp.tensordot(pick, a, axes=1), stacked)


def private_step_fn(problem, spsa_config, plan: PrivacyPlan, num_chunks: int):
    """(theta, frozen, *chunks, *labels, pick, included, z, noise, lr) -> (theta', loss):
    every training chunk's features, then every chunk's labels, as separate arguments."""
    loss = per_example_loss(problem.logits)

    def step(t, f, *rest):
        chunks, labels = rest[:num_chunks], rest[num_chunks : 2 * num_chunks]
        pick, included, z, noise, lr = rest[2 * num_chunks :]
        batch = {**gather_rows(pick, chunks), "labels": gather_rows(pick, labels), "included": included}  # fmt: skip
        new_t, info = privacy.dp_spsa_step(
            loss, t, f, batch, z, noise, lr, spsa_config,
            plan.clip, plan.noise_multiplier, plan.expected_batch,
        )  # fmt: skip
        return new_t, info["loss"]

    return step


def data_owner_draws(seed: int, step: int, plan: PrivacyPlan) -> tuple[np.ndarray, ...]:
    """At the data owner, from its PRIVATE seed: (pick [R, n], included [R], noise [K]) of
    `step`. Deterministic in (seed, step), so a resumed run draws what the first would."""
    rng = np.random.default_rng([seed, 29, step])
    index, included = privacy.poisson_batch(rng, plan.num_rows, plan.rate, plan.max_rows)
    pick = np.zeros((plan.max_rows, plan.num_rows), np.float32)
    pick[np.arange(plan.max_rows), index] = 1.0
    return pick, included, privacy.noise_draw(rng, plan.directions)


__all__ = ["PrivacyPlan", "data_owner_draws", "gather_rows", "privacy_plan", "private_step_fn"]
