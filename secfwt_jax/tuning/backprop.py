"""Backpropagation baseline (the paper's "SFT" row): `jax.grad` plus an optax optimiser.

Same trainable sets and loss as the forward-only step, so accuracy and cost compare like
for like. Compiling `backprop_step` for SPU gives the secure-backward cost that SecFwT
removes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import optax

from secfwt_jax.tuning.spsa import LossFn, PyTree


def make_optimizer(kind: Literal["sgd", "adam"], learning_rate) -> optax.GradientTransformation:
    if kind == "sgd":
        return optax.sgd(learning_rate)
    if kind == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"optimizer: unknown {kind!r}; use 'sgd' or 'adam'")


def backprop_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    trainable: PyTree,
    frozen: PyTree,
    batch: dict,
    opt_state,
) -> tuple[PyTree, object, dict]:
    """One gradient step: returns (new trainable, new optimiser state, {loss})."""
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, {"loss": loss}


def make_backprop_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    return jax.jit(lambda t, f, b, s: backprop_step(loss_fn, optimizer, t, f, b, s))
