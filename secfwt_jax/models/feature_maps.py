"""Random feature maps for random feature attention (RFA), written to be cheap under MPC.

All randomness here is public: the directions w come from numpy with a public seed at
trace time and enter the program as constants. Nothing calls `jax.random`, which SPU does
not compute correctly.

Trigonometry has two modes:

* `exact_sin_cos`: `jnp.sin` / `jnp.cos`. Under SPU these do a floor-based range
  reduction (about 360 B and 22 rounds per element, SEMI2K FM64).
* `poly_sin_cos`: clip t to [-B, B], set s = t / B, and evaluate
  cos(t) = sum_i a_i s^(2i) and sin(t) = s * sum_i b_i s^(2i) from ONE shared set of even
  powers u^i (u = s^2). The powers are built in ceil(log2(K)) + 1 batched multiplications
  (each level multiplies a stacked block at once, so a level is one MPC round trip, not
  K); the linear combinations with public coefficients are local. The fit is a least
  squares fit on a dense grid, and `poly_error_bound` reports its max error on [-B, B].
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


def random_directions(
    seed: int, layer: int, num_heads: int, head_dim: int, num_features: int, sigma: float
) -> np.ndarray:
    """Public directions w = g / sigma, g ~ N(0, I): [heads, head_dim, num_features], float32.

    Drawn from numpy on the host from (seed, layer), so every party regenerates the same
    matrix; it is fixed, never trained and never secret.
    """
    rng = np.random.default_rng([seed, layer])
    g = rng.standard_normal((num_heads, head_dim, num_features))
    return (g / sigma).astype(np.float32)


def exact_sin_cos(t: jnp.ndarray, **_) -> tuple[jnp.ndarray, jnp.ndarray]:
    return jnp.sin(t), jnp.cos(t)


@functools.lru_cache(maxsize=32)
def poly_coefficients(bound: float, degree: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit cos(B s) and sin(B s) / s on s in [-1, 1] in powers of u = s^2.

    Returns (cos_coeffs [K+1], sin_coeffs [K+1], max_abs_error on [-B, B]) with K = degree/2;
    cos uses powers up to s^degree and sin up to s^(degree+1).
    """
    k = degree // 2
    s = np.cos(np.linspace(0.0, np.pi, 4097))  # Chebyshev nodes: near-minimax fit
    u_powers = np.stack([s ** (2 * i) for i in range(k + 1)], axis=1)
    a, *_ = np.linalg.lstsq(u_powers, np.cos(bound * s), rcond=None)
    b, *_ = np.linalg.lstsq(s[:, None] * u_powers, np.sin(bound * s), rcond=None)
    grid = np.linspace(-1.0, 1.0, 20001)
    grid_u = np.stack([grid ** (2 * i) for i in range(k + 1)], axis=1)
    err_cos = np.max(np.abs(grid_u @ a - np.cos(bound * grid)))
    err_sin = np.max(np.abs(grid * (grid_u @ b) - np.sin(bound * grid)))
    return a.astype(np.float32), b.astype(np.float32), float(max(err_cos, err_sin))


def poly_error_bound(bound: float, degree: int) -> float:
    """Max abs error of `poly_sin_cos` on [-bound, bound] (in plaintext float64)."""
    return poly_coefficients(bound, degree)[2]


def even_powers(u: jnp.ndarray, k: int) -> jnp.ndarray:
    """[u^1, ..., u^k] stacked on a new leading axis, in ceil(log2 k) batched multiplies.

    Level j multiplies the block [u^1 .. u^(2^j)] by u^(2^j) in one elementwise op, so the
    MPC cost is one multiplication round trip per level.
    """
    powers = u[None]
    while powers.shape[0] < k:
        top = powers[-1]
        take = min(powers.shape[0], k - powers.shape[0])
        powers = jnp.concatenate([powers, powers[:take] * top[None]], axis=0)
    return powers


def poly_sin_cos(t: jnp.ndarray, *, bound: float, degree: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Bounded polynomial sin and cos sharing one set of even powers; see module doc."""
    a, b, _ = poly_coefficients(bound, degree)
    s = jnp.clip(t, -bound, bound) * (1.0 / bound)
    powers = even_powers(s * s, degree // 2)  # [K, ...]
    cos = a[0] + jnp.tensordot(jnp.asarray(a[1:]), powers, axes=1)
    sin = s * (b[0] + jnp.tensordot(jnp.asarray(b[1:]), powers, axes=1))
    return sin, cos


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """x / |x| over the last axis (rsqrt is one MPC primitive; no division)."""
    return x * jnp.reciprocal(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps))


def trig_features(x: jnp.ndarray, w: jnp.ndarray, sin_cos) -> jnp.ndarray:
    """[sin(w^T x), cos(w^T x)] / sqrt(m): x [B, N, H, D], w [H, D, m] -> [B, N, H, 2m]."""
    t = jnp.einsum("bnhd,hdm->bnhm", x, w)
    sin, cos = sin_cos(t)
    return jnp.concatenate([sin, cos], axis=-1) * (1.0 / np.sqrt(w.shape[-1]))


def positive_features(x: jnp.ndarray, w: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """FAVOR+ features exp(w^T x - |x|^2 / 2 sigma^2) / sqrt(m): [B,N,H,D] -> [B,N,H,m].

    With w = g / sigma, E[phi(x) . phi(y)] = exp(x . y / sigma^2): positive, so the RFA
    denominator can never cross zero.
    """
    t = jnp.einsum("bnhd,hdm->bnhm", x, w)
    sq = (0.5 / sigma**2) * jnp.sum(x * x, axis=-1, keepdims=True)
    return jnp.exp(t - sq) * (1.0 / np.sqrt(w.shape[-1]))
