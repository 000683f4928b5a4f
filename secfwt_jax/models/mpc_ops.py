"""Numerics that stay accurate under MPC fixed point and are exact in floating point.

Under SPU (FM64, 18 fraction bits) every value has an absolute precision of 2^-18 (about
3.8e-6), every secret product is truncated with a bias of up to half an ulp, and
reciprocal / rsqrt are approximations (measured here, SEMI2K FM64: reciprocal up to 7e-4
relative error on [2, 200], rsqrt up to 3e-4 on [0.01, 100]). These helpers rearrange the
maths so that small intermediates are never materialised and one Newton step squares the
approximation error. In floating point they compute the same values as the textbook forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def refined_reciprocal(x: jnp.ndarray) -> jnp.ndarray:
    """1 / x plus one Newton step r (2 - x r): two extra elementwise multiplies."""
    r = jnp.reciprocal(x)
    return r * (2.0 - x * r)


def refined_rsqrt(x: jnp.ndarray) -> jnp.ndarray:
    """1 / sqrt(x) plus one Newton step y (3 - x y^2) / 2.

    Evaluated as ((x / 2) y) y so that no intermediate is smaller than y itself: y^2 of a
    small y would vanish in fixed point.
    """
    y = jax.lax.rsqrt(x)
    return y * (1.5 - 0.5 * x * y * y)


def layer_norm(x: jnp.ndarray, scale, bias, eps: float) -> jnp.ndarray:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis.

    The variance is never formed: rsqrt(var + eps) = sqrt(n) * rsqrt(sum(c^2) + n eps)
    with c = x - mean. Typical LayerNorm inputs have variances of 1e-3..1e-2 (BERT
    embeddings), which fixed point holds to only ~1e-3 relative, while sum(c^2) is n times
    larger. Measured on all-MiniLM-L6-v2's embedding LayerNorm under SEMI2K FM64: relative
    error 5.4e-4 with the textbook form, 6e-5 with this one. The sum of squares is an
    elementwise product and a reduce, not an einsum: SPU truncates once after the reduce
    either way, but it runs a batched dot_general as a loop with 2 rounds per row (41 vs 87
    rounds for 24 rows here; the demo SPSA step went from 2,781 to 1,062 rounds).
    """
    n = x.shape[-1]
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    sum_sq = jnp.sum(centred * centred, axis=-1, keepdims=True)
    inv_std = refined_rsqrt(sum_sq + n * eps) * np.float32(np.sqrt(n))
    return centred * inv_std * scale + bias
