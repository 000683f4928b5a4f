"""Random feature maps for random feature attention (RFA), written to be cheap under MPC.

All randomness here is public: the directions w come from numpy with a public seed at
trace time and enter the program as constants. Nothing calls `jax.random`, which SPU does
not compute correctly.

Trigonometry has two modes (`trig_features(..., trig=...)`):

* "exact": `jnp.sin` / `jnp.cos`. Under SPU these do a floor-based range reduction
  (about 360 B and 22 rounds per element, SEMI2K FM64).
* "poly": s = (w / B)^T x lies in [-1, 1] (B folded into the public w). A polynomial in s
  (cos of even degree p, sin p + 1, evaluated in u = s^2; by default p is
  `cheapest_degree(B)`) gives sin and cos of B s / 2^r on a base range, then r
  double-angle steps (one stacked multiply each) reach the full range, r the fewest that
  keep the error within `TRIG_TOLERANCE` (`num_doublings`). For the l2 variant B is a
  guaranteed bound (|x| <= 1): `max_norm(w)`, raised to the bound every layer shares
  (`direction_bound`), so no comparison is needed at all; otherwise arguments are
  clipped to [-B, B]. `poly_error_bound(B, degree)` gives the max error on [-B, B]
  (see docs/attention.md).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.mpc_ops import refined_rsqrt, rsqrt_pow2, sum_of_squares


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


#: Max abs error of the polynomial sin and cos over the whole range [-B, B] (float64): the
#: number of double-angle steps is the fewest that meet it (`num_doublings`).
TRIG_TOLERANCE = 1e-4


@functools.lru_cache(maxsize=64)
def num_doublings(bound: float, degree: int) -> int:
    """Fewest double-angle steps r such that the degree-`degree` fit on the base range
    [-B / 2^r, B / 2^r], doubled r times, is within `TRIG_TOLERANCE` of sin and cos on
    [-B, B]. Each step costs two products; a higher degree costs products for its powers
    but reaches a wider base range (at B = 9.79: degree 6 needs r = 3, degree 8 r = 2)."""
    for r in range(64):
        if _doubled_error(float(bound), degree, r) <= TRIG_TOLERANCE:
            return r
    raise ValueError(f"poly trig: no double-angle count reaches {TRIG_TOLERANCE} at bound {bound}")


#: Degrees the automatic choice (`cheapest_degree`) picks from. Higher degrees can need
#: fewer products but their coefficients grow (tens at degree 12 on the wide base ranges
#: they reach), multiplying the fixed-point noise under MPC.
AUTO_DEGREES = (6, 8, 10)


def trig_products(bound: float, degree: int) -> tuple[int, int]:
    """(secret products, multiply ops) per projected element of the poly sin/cos at
    `bound`: s^2, the powers of u, s a(u), and two products per doubling."""
    r = num_doublings(bound, degree)
    half = degree // 2
    ops = 1 + int(np.ceil(np.log2(half))) + 1 + 1 + r  # s^2, powers, tensordot, s a(u), doublings
    return 1 + (half - 1) + 1 + 2 * r, ops


@functools.lru_cache(maxsize=64)
def cheapest_degree(bound: float) -> int:
    """The degree in `AUTO_DEGREES` with the fewest products at `bound` (then the fewest
    ops, then the lowest degree): 8 at the l2 bounds of d = 32 (about 8.6), 10 at d = 64
    (about 10.8)."""
    return min(AUTO_DEGREES, key=lambda p: (*trig_products(bound, p), p))


#: Layers whose directions `direction_bound` covers (GPT-2 XL has 48).
BOUND_LAYERS = 48


@functools.lru_cache(maxsize=32)
def direction_bound(seed: int, num_heads: int, head_dim: int, num_features: int, sigma: float) -> float:  # fmt: skip
    """max_j |w_j| over the directions of layers 0 .. BOUND_LAYERS - 1. The l2 variant uses
    it (or a deeper layer's own bound, if larger) as every layer's bound, so every layer
    runs the same doublings: the same cost per layer, which the bench's layer
    extrapolation relies on. Each layer's own bound varies by about 10% (9.97 to 10.96
    over BERT-base's shapes), across the thresholds where one more doubling is needed."""
    return max(
        max_norm(random_directions(seed, layer, num_heads, head_dim, num_features, sigma))
        for layer in range(BOUND_LAYERS)
    )


def max_norm(w) -> float:
    """max_j |w_j| over the directions of w [H, D, m]: a bound on |w_j^T x| for |x| <= 1."""
    return float(np.linalg.norm(np.asarray(w), axis=1).max())


@functools.lru_cache(maxsize=64)
def poly_coefficients(base: float, degree: int, scale: float = 1.0) -> np.ndarray:
    """Fit scale*sin(base s) (odd, up to s^(degree+1)) and scale*cos(base s) (even, up to
    s^degree) on s in [-1, 1]. Returns [2, degree + 2]: row 0 sin, row 1 cos, column p the
    coefficient of s^p (column 0 is cos's constant)."""
    s = np.cos(np.linspace(0.0, np.pi, 4097))  # Chebyshev nodes: near-minimax fit
    odd = np.arange(1, degree + 2, 2)
    even = np.arange(0, degree + 1, 2)
    b, *_ = np.linalg.lstsq(s[:, None] ** odd, scale * np.sin(base * s), rcond=None)
    a, *_ = np.linalg.lstsq(s[:, None] ** even, scale * np.cos(base * s), rcond=None)
    coeffs = np.zeros((2, degree + 2))
    coeffs[0, odd], coeffs[1, even] = b, a
    return coeffs


def stacked_powers(x, k: int, xp=jnp):
    """[x^1, ..., x^k] stacked on a new leading axis, in ceil(log2 k) batched multiplies.

    Level j multiplies the block [x^1 .. x^(2^j)] by x^(2^j) in one elementwise op, so the
    MPC cost is one multiplication (2 rounds under SEMI2K) per level, whatever k.
    """
    powers = x[None]
    while powers.shape[0] < k:
        take = min(powers.shape[0], k - powers.shape[0])
        powers = xp.concatenate([powers, powers[:take] * powers[-1][None]], axis=0)
    return powers


def reused_powers(x, k: int):
    """[x^1, ..., x^k] stacked on a new leading axis, one product at a time, each new
    power first multiplied by an earlier one: x^2 = x x, then x^j = x^(j/2) x^(j/2) for
    even j and x^(j-1) x for odd j. Under SEMI2K with its openings cached
    (`secfwt_jax.compile.openings`) each power that is an operand is opened once (x twice,
    for its first square), where `stacked_powers` opens 2 values per product; its k - 1
    products run one after another, but one whose operands are both cached sends nothing
    (x^4 = x^2 x^2), so at k = 5 the rounds are `stacked_powers`' 3."""
    powers = [x]
    for j in range(2, k + 1):
        powers.append(powers[j // 2 - 1] * powers[j // 2 - 1] if j % 2 == 0 else powers[j - 2] * x)
    return jnp.stack(powers)


def poly_sin_cos_unit(
    s,
    *,
    bound: float,
    degree: int,
    scale: float = 1.0,
    xp=jnp,
    doublings: int | None = None,
    schedule: str = "stacked",
):
    """scale * sin(B s) and scale * cos(B s) for s in [-1, 1] (B = `bound`), no clipping.

    1. r = `doublings`, by default `num_doublings(B, degree)`; a polynomial of degree
       `degree` (cos) / `degree + 1` (sin) in s gives S = l sin(B s / 2^r) and
       C = l cos(B s / 2^r) on the base range [-B / 2^r, B / 2^r], with
       l = scale^(1 / 2^r) folded into its public coefficients. Both are polynomials
       in u = s^2: C = c(u), S = s a(u). So u^1..u^(degree/2) come from one
       `stacked_powers` of u, both sums from one public tensordot, and S from one more product: degree/2 + 1 products per element (4 at
       degree 6, 5 at degree 8) instead of degree for all the powers of s.
    2. r double-angle steps, each ONE stacked multiply [S, C] * C:
       S' = 2 S C = l^2 sin(2 theta), C' = 2 C^2 - l^2 = l^2 cos(2 theta). Doubling is an
       addition and l^2 a public constant, so neither costs a truncation; after r steps
       l^(2^r) = scale, i.e. the 1/sqrt(m) feature scale comes for free.
    Errors grow by at most 2x per doubling; `poly_error_bound` measures the total.

    `schedule` (`config.TrigSchedule`) orders the same products: "stacked" puts each level's
    products in one op (fewest rounds); "reused" gives every product its own op so that a
    value meets each later product as the same array, which SEMI2K opens once when its
    openings are cached (`reused_powers`; a doubling is S C, then C C with C's opening
    reused): 11 openings per element instead of 20 at degree 10 with 2 doublings, in the
    same rounds with probabilistic truncation (3 more with the exact one, whose products
    each truncate). The values are the same either way.
    """
    r = num_doublings(bound, degree) if doublings is None else doublings
    lam = scale ** (0.5**r)
    coeffs = poly_coefficients(bound / 2**r, degree, lam)
    half = degree // 2
    reused = schedule == "reused" and xp is jnp
    # [u, u^2, ..., u^half], u = s^2
    powers = reused_powers(s * s, half) if reused else stacked_powers(s * s, half, xp)
    # row 0: a(u) - a_0 (sin's s^3, s^5, ... over s), row 1: c(u) - c_0 (cos's s^2, s^4, ...)
    rows = np.stack([coeffs[0, 3::2], coeffs[1, 2::2]])  # [2, half]
    both = xp.tensordot(xp.asarray(rows, dtype=s.dtype), powers, axes=1)
    sin, cos = s * (both[0] + coeffs[0, 1]), both[1] + coeffs[1, 0]
    for _ in range(r):
        if reused:  # sin first: cos is then opened once for both products
            prod = (sin * cos, cos * cos)
        else:
            prod = xp.stack([sin, cos]) * cos[None]
        lam = lam * lam
        sin, cos = prod[0] + prod[0], prod[1] + prod[1] - lam
    return sin, cos


def poly_error_bound(bound: float, degree: int) -> float:
    """Max abs error of `poly_sin_cos` vs sin/cos on [-bound, bound], in float64 plaintext
    (a dense grid of 40001 points); at most `TRIG_TOLERANCE`. Under MPC add fixed-point
    noise (about 2^-18 per operation, times up to 2^r from the doublings)."""
    return _doubled_error(float(bound), degree, num_doublings(bound, degree))


@functools.lru_cache(maxsize=256)
def _doubled_error(bound: float, degree: int, doublings: int) -> float:
    t = np.linspace(-bound, bound, 40001)
    sin, cos = poly_sin_cos_unit(t / bound, bound=bound, degree=degree, xp=np, doublings=doublings)  # fmt: skip
    return float(max(np.max(np.abs(sin - np.sin(t))), np.max(np.abs(cos - np.cos(t)))))


def poly_sin_cos(t, *, bound: float, degree: int):
    """Bounded polynomial sin(t), cos(t): t is clipped to [-bound, bound] (so outside the
    range the result is sin/cos of +-bound); see `poly_sin_cos_unit`."""
    s = jnp.clip(t * (1.0 / bound), -1.0, 1.0)
    return poly_sin_cos_unit(s, bound=bound, degree=degree)


def feature_width(variant: str, num_features: int) -> int:
    """Features per head: [sin, cos] of m directions (2m), or m for the positive variant."""
    return num_features if variant == "positive" else 2 * num_features


def inverse_norm(x: jnp.ndarray, eps: float = 1e-6, also=None, impl: str = "bucketed"):
    """1 / |x| over the last axis, kept as a trailing axis of size 1: one `rsqrt_pow2`
    (impl "bucketed") or SPU's rsqrt refined ("spu"; see `config.InverseImpl`).
    ``also=(a, b)``: (1 / |x|, a * b) ("bucketed": a * b inside one of its ops)."""
    if impl == "spu":
        inv = refined_rsqrt(sum_of_squares(x) + eps)
        return inv if also is None else (inv, also[0] * also[1])
    # |x|^2 < 2^19 (|x| < 724 for a q or k head vector) keeps the normalisation to one
    # product (3 rounds fewer); beyond, 1/|x| saturates at 2^-9.5.
    return rsqrt_pow2(sum_of_squares(x) + eps, hi=L2_NORM_HI, also=also)


#: hi of the l2 norms' `rsqrt_pow2` range (see `inverse_norm`).
L2_NORM_HI = 19


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """x / |x| over the last axis (one `rsqrt_pow2`; no division)."""
    return x * inverse_norm(x, eps)


def trig_features(
    x,
    w,
    *,
    trig: str = "exact",
    bound: float | None = None,
    degree: int | None = None,
    row_scale=None,
    bound_at_least: float = 0.0,
    schedule: str = "stacked",
):
    """[sin(w^T x), cos(w^T x)] / sqrt(m): x [B, N, H, D], w [H, D, m] -> [B, N, H, 2m].

    `row_scale` [B, N, H, 1] multiplies each row after the projection: w^T (r x) = r w^T x.
    The l2 variant passes r = 1/|x| (`inverse_norm`) so that the scaling costs one product
    per feature (m) instead of one per coordinate (D); under MPC each is a secret product
    with a truncation, so at m = 32, D = 64 this halves it.

    trig "exact": jnp.sin / jnp.cos. trig "poly": `bound` None means |w^T x| <= max_j |w_j|
    is guaranteed (|x| <= 1, the l2 variant; Cauchy-Schwarz), so that bound is used and
    nothing is clipped (raised to `bound_at_least`, a larger guaranteed bound shared by
    every layer: `direction_bound`); otherwise arguments are clipped to [-bound, bound].
    `degree` None: `cheapest_degree(B)`; `schedule`: see `poly_sin_cos_unit`. 1/B is folded
    into the public w and 1/sqrt(m) into the polynomial, so neither costs an MPC op.
    """
    scale = 1.0 / np.sqrt(w.shape[-1])
    if trig == "exact":
        t = project(x, w)
        if row_scale is not None:
            t = t * row_scale
        return jnp.concatenate([jnp.sin(t), jnp.cos(t)], axis=-1) * scale
    clip = bound is not None
    bound = float(bound) if clip else max(max_norm(w), bound_at_least)
    degree = cheapest_degree(bound) if degree is None else degree
    s = project(x, (np.asarray(w) / bound).astype(np.float32))
    if row_scale is not None:
        s = s * row_scale
    if clip:
        s = jnp.clip(s, -1.0, 1.0)
    sin, cos = poly_sin_cos_unit(s, bound=bound, degree=degree, scale=scale, schedule=schedule)
    return jnp.concatenate([sin, cos], axis=-1)


def project(x, w):
    """w^T x per head, [B, N, H, D] x [H, D, m] -> [B, N, H, m], as ONE matmul with the
    public block-diagonal [H D, H m] matrix: SPU 0.9.3 would loop over the heads (a
    truncation round each); the zeros are public, so the result and the bytes are the
    same."""
    h, d, m = w.shape
    blocks = np.zeros((h, d, h, m), np.float32)
    blocks[np.arange(h), :, np.arange(h), :] = np.asarray(w)
    out = x.reshape(x.shape[:-2] + (h * d,)) @ blocks.reshape(h * d, h * m)
    return out.reshape(x.shape[:-2] + (h, m))


def positive_features(x: jnp.ndarray, w: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """FAVOR+ features exp(w^T x - |x|^2 / 2 sigma^2) / sqrt(m): [B,N,H,D] -> [B,N,H,m].

    With w = g / sigma, E[phi(x) . phi(y)] = exp(x . y / sigma^2): positive, so the RFA
    denominator can never cross zero.
    """
    t = project(x, w)
    sq = (0.5 / sigma**2) * jnp.sum(x * x, axis=-1, keepdims=True)
    return jnp.exp(t - sq) * (1.0 / np.sqrt(w.shape[-1]))
