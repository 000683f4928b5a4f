"""Forward-only SPSA / MeZO step, pure and jittable, built to compile into MPC bytecode.

For K public directions z_k (pytrees shaped like the trainable parameters theta):

    L+_k = L(theta + eps z_k),  L-_k = L(theta - eps z_k)      (2K forwards, no backward)
    g_k  = (L+_k - L-_k) / (2 eps)                              (projected gradient, scalar)
    theta <- theta (1 - eta wd) - eta / K * sum_k g_k z_k

Under MPC theta is secret and z, eps, eta are public, so theta +- eps z and g_k z_k are
secret-public operations (local, no communication); only the losses are secret scalars.
SPU has no `rng_normal` and mis-computes `jax.random`, so z is drawn on the host from a
public seed (`directions`) and passed in as a public input. In plaintext the same function
runs under `jax.jit`; `spsa_step_seeded` regenerates z inside the jit instead (MeZO's
memory trick: z is never stored between steps).

All 2K forwards run as ONE vmapped forward over a stacked parameter axis by default: under
MPC that is one set of communication rounds instead of 2K.

Direction distributions (`SpsaConfig.directions`): "gaussian" z ~ N(0, I), or
"rademacher" z in {-1, +1}^d (uniform signs; same E[z z^T] = I, so the same unbiased
gradient estimate). With Rademacher directions every z-dependent operation is a select on
the PUBLIC sign of z: theta +- eps z = where(z > 0, theta +- eps, theta -+ eps) and
sum_k c_k z_k = sum_k where(z_k > 0, c_k, -c_k). Under MPC a select on a public predicate
and additions are local, so perturbations and update cost 0 bytes, against one truncation
per parameter (64 B under ABY3 FM64) for the product c_k z_k with a Gaussian z. The step
reads only the sign of z then, so any z with the right signs gives the same step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[[PyTree, PyTree, dict], jnp.ndarray]  # (trainable, frozen, batch) -> scalar
DirectionKind = Literal["gaussian", "rademacher"]
DIRECTION_KINDS: tuple[str, ...] = ("gaussian", "rademacher")


@dataclasses.dataclass(frozen=True)
class SpsaConfig:
    """eps: perturbation scale; num_directions: K (n-SPSA); weight_decay: decoupled L2;
    batched: evaluate all 2K forwards as one vmapped forward (fewer MPC rounds, more
    memory) or sequentially with `lax.map` (MeZO-like memory); directions: the
    distribution of z, "gaussian" or "rademacher" (free perturbations and update under
    MPC; see the module doc)."""

    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0
    batched: bool = True
    directions: DirectionKind = "gaussian"

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError("spsa.eps: must be positive")
        if self.num_directions < 1:
            raise ValueError("spsa.num_directions: must be >= 1")
        if self.weight_decay < 0:
            raise ValueError("spsa.weight_decay: must be >= 0")
        if self.directions not in DIRECTION_KINDS:
            raise ValueError(
                f"spsa.directions: unknown {self.directions!r}; expected one of {DIRECTION_KINDS}"
            )


DEFAULT_SPSA = SpsaConfig()


def directions(
    seed: int, step: int, like: PyTree, num_directions: int = 1, kind: DirectionKind = "gaussian"
) -> PyTree:
    """Public directions [K, *leaf.shape] per leaf, float32, from numpy on the host:
    N(0, 1) entries for kind "gaussian", +-1 with equal probability for "rademacher".

    Deterministic in (seed, step, kind): every party and the plaintext reference
    regenerate the same z, so z never needs to be stored or sent.
    """
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"spsa.directions: unknown {kind!r}; expected one of {DIRECTION_KINDS}")
    rng = np.random.default_rng([seed, step])

    def draw(leaf):
        shape = (num_directions,) + np.shape(leaf)
        if kind == "rademacher":
            return (2 * rng.integers(0, 2, shape, dtype=np.int8) - 1).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    return jax.tree_util.tree_map(draw, like)


def _signed(z, a, b):
    """where(z > 0, a, b) with [K]-shaped a, b broadcast over z's trailing axes: local
    under MPC when z is public, whatever a and b are."""
    shape = a.shape + (1,) * (z.ndim - a.ndim)
    return jnp.where(z > 0, jnp.reshape(a, shape), jnp.reshape(b, shape))


def evaluate_population(
    loss_fn: LossFn, population: PyTree, frozen: PyTree, batch: dict, batched: bool = True
) -> jnp.ndarray:
    """Losses [P] of P stacked candidate parameter sets (leading axis P on every leaf)."""
    single = lambda theta: loss_fn(theta, frozen, batch)  # noqa: E731
    if batched:
        return jax.vmap(single)(population)
    return jax.lax.map(single, population)


def spsa_update(
    trainable: PyTree,
    z: PyTree,
    loss_plus,
    loss_minus,
    step_size,
    config: SpsaConfig = DEFAULT_SPSA,
) -> tuple[PyTree, jnp.ndarray]:
    """theta (1 - eta wd) - eta / K sum_k g_k z_k with g = (L+ - L-) / 2 eps.

    Returns (new trainable, g [K]). Every scalar is folded into the K coefficients first:
    under MPC each elementwise product of a secret with a public value costs a truncation
    per parameter, so the update costs one (the dot product with z) instead of four, and
    the decay is skipped entirely at weight_decay 0.
    """
    grad = (loss_plus - loss_minus) * (1.0 / (2.0 * config.eps))  # [K], secret under MPC
    return apply_projected_gradient(trainable, z, grad, step_size, config), grad


def apply_projected_gradient(
    trainable: PyTree, z: PyTree, grad, step_size, config: SpsaConfig = DEFAULT_SPSA
) -> PyTree:
    """theta (1 - eta wd) - eta / K sum_k g_k z_k for projected gradients g [K] (SPSA's,
    or a private step's clipped and noised ones)."""
    k = grad.shape[0]
    coefficients = grad * (step_size * (1.0 / k))  # [K]

    def update(t, zk):
        if config.weight_decay:
            t = t * (1.0 - step_size * config.weight_decay)
        if config.directions == "rademacher":  # sum_k c_k z_k as selects: 0 bytes
            return t - jnp.sum(_signed(zk, coefficients, -coefficients), axis=0)
        return t - jnp.tensordot(coefficients, zk, axes=1)

    return jax.tree_util.tree_map(update, trainable, z)


def perturbed_pair(
    trainable: PyTree, z: PyTree, eps: float, kind: DirectionKind = "gaussian"
) -> PyTree:
    """Stack [theta + eps z_1..K, theta - eps z_1..K] on a new leading axis of size 2K.

    kind "rademacher" reads only the sign of z: theta +- eps as a select (no product)."""

    def pair(t, zk):
        if kind == "rademacher":
            up, down = t[None] + eps, t[None] - eps
            return jnp.concatenate([jnp.where(zk > 0, up, down), jnp.where(zk > 0, down, up)])
        return jnp.concatenate([t[None] + eps * zk, t[None] - eps * zk], axis=0)

    return jax.tree_util.tree_map(pair, trainable, z)


def spsa_step(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    z: PyTree,
    step_size,
    config: SpsaConfig = DEFAULT_SPSA,
) -> tuple[PyTree, dict]:
    """One SPSA step with given public directions z ([K, ...] per leaf).

    Returns (new trainable, info) with info = {loss: mean of L+ and L- [], loss_plus [K],
    loss_minus [K], projected_grad [K]}.
    """
    k = jax.tree_util.tree_leaves(z)[0].shape[0]
    losses = evaluate_population(
        loss_fn,
        perturbed_pair(trainable, z, config.eps, config.directions),
        frozen,
        batch,
        config.batched,
    )
    loss_plus, loss_minus = losses[:k], losses[k:]
    new_trainable, grad = spsa_update(trainable, z, loss_plus, loss_minus, step_size, config)
    info = {
        "loss": 0.5 * (jnp.mean(loss_plus) + jnp.mean(loss_minus)),
        "loss_plus": loss_plus,
        "loss_minus": loss_minus,
        "projected_grad": grad,
    }
    return new_trainable, info


def spsa_step_seeded(
    loss_fn: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    key: jax.Array,
    step_size,
    config: SpsaConfig = DEFAULT_SPSA,
):
    """Plaintext-only variant: z drawn inside the jit from `key` (never stored).

    Do not compile this for SPU: `jax.random` is not computed correctly there.
    """
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    draw = jax.random.rademacher if config.directions == "rademacher" else jax.random.normal
    z_leaves = [
        draw(kk, (config.num_directions,) + leaf.shape, leaf.dtype)
        for kk, leaf in zip(keys, leaves, strict=True)
    ]
    z = jax.tree_util.tree_unflatten(treedef, z_leaves)
    return spsa_step(loss_fn, trainable, frozen, batch, z, step_size, config)
