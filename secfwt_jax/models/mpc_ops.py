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
    error 5.4e-4 with the textbook form, 6e-5 with this one. The sum of squares is
    `sum_of_squares`: one 2-D Gram matrix when the rows are few, else elementwise (never a
    batched einsum, which SPU runs as a loop with 2 rounds per row).
    """
    n = x.shape[-1]
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    sum_sq = sum_of_squares(centred)
    inv_std = refined_rsqrt(sum_sq + n * eps) * np.float32(np.sqrt(n))
    return centred * inv_std * scale + bias


# ------------------------------------------------------------------------------- GeLU
#
# GeLU(x) = x / 2 + g(x) with g(x) = x erf(x / sqrt 2) / 2 EVEN, and g(x) -> |x| / 2 fast
# (|GeLU(x) - relu(x)| = |x| Phi(-|x|) <= 1.3e-4 for |x| >= 4). So on [-B, B] one even
# polynomial, of degree 6 in t = 2 (x / B)^2 - 1 (degree 12 in x), carries g, and outside
# it GeLU is x (x > B) or 0 (x < -B). Chebyshev coefficients (not monomials) keep every
# intermediate in [-1, 1] and the coefficients small (sum |c| = 2.5), so fixed-point
# noise is not amplified. Fitted by iteratively reweighted least squares to near-minimax
# on [-B, B] (the script is in docs/cost.md); max error over the real line:
#   "erf"  (exact GeLU):      7.2e-4 inside, 1.3e-4 at the switch points
#   "tanh" (gelu_new):        7.5e-4 inside, 7.0e-5 at the switch points
# Puma's piecewise GeLU (Dong et al. 2023) has max error 2.0e-2 (at its -1.95 knot).
GELU_BOUND = 4.0
GELU_CHEBYSHEV: dict[str, tuple[float, ...]] = {
    "erf": (1.231144689, 0.9158448183, -0.2012018376, 0.07440237194, -0.02721809888,
            0.00897007366, -0.002788084255),
    "tanh": (1.231264235, 0.9159448427, -0.2014094155, 0.07436623958, -0.02707522711,
             0.008900411499, -0.002814703384),
}  # fmt: skip


def gelu_paterson_stockmeyer(cheb: tuple[float, ...]) -> tuple[np.ndarray, float, float]:
    """Rewrite sum_i c_i T_i(t), i <= 6, as (a0 + A . basis) + T_3 (b0 + B . basis) with
    basis = [T_1, T_2, T_3, x] and the x / 2 term in row A (T_3 T_j = (T_(3+j) +
    T_(3-j)) / 2). Returns (W [2, 4], a0, b0). Under MPC this needs T_1..T_3 (3 products)
    plus one more product, instead of T_1..T_6 (5 products)."""
    c = list(cheb) + [0.0] * (7 - len(cheb))
    w = np.array(
        [[c[1] - c[5], c[2] - c[4], 0.0, 0.5], [2 * c[4], 2 * c[5], 2 * c[6], 0.0]],
        dtype=np.float32,
    )
    return w, c[0] - c[6], c[3]


def gelu_piecewise(x: jnp.ndarray, approximate: bool = False) -> jnp.ndarray:
    """GeLU as two comparisons and one even polynomial, elementwise (any shape).

    approximate=False targets the exact erf GeLU, True the tanh form (``gelu_new``).
    Max error: see `GELU_CHEBYSHEV`. MPC cost per element, ABY3 FM64 (measured,
    docs/cost.md): about 0.9 KB and 29 rounds, against 4.9 KB and 186 rounds for the
    exact GeLU with the ``erf_exp`` rewrite: one stacked comparison [x > B, -x > B], the
    scale x / B, 4 products (t, T_2, T_3 and T_3 times row B), one public [2, 4] dot,
    two selects. The selects are exact in the ring, so the polynomial's (possibly
    wrapped-around) value far outside [-B, B] never leaks into the result.
    """
    w, a0, b0 = gelu_paterson_stockmeyer(GELU_CHEBYSHEV["tanh" if approximate else "erf"])
    s = x * (1.0 / GELU_BOUND)
    sq = s * s
    t1 = sq + sq - 1.0  # doubling is an addition: no truncation
    p2 = t1 * t1
    t2 = p2 + p2 - 1.0
    p3 = t1 * t2
    t3 = p3 + p3 - t1
    rows = jnp.tensordot(jnp.asarray(w, x.dtype), jnp.stack([t1, t2, t3, x]), axes=1)
    inner = (rows[0] + a0) + t3 * (rows[1] + b0)
    above, below = jnp.stack([x, -x]) > GELU_BOUND  # one comparison op, stacked
    return jnp.where(above, x, jnp.where(below, jnp.zeros_like(x), inner))


def gelu_quad(x: jnp.ndarray) -> jnp.ndarray:
    """MPCFormer's "Quad" GeLU stand-in, 0.125 x^2 + 0.25 x + 0.5, as x (x + 2) / 8 + 1/2."""
    return (x * (x + 2.0)) * 0.125 + 0.5


# ------------------------------------------------------------- exp of x <= 0 (softmax)
#
# Softmax subtracts each row's max, so every exp argument is <= 0. There exp(x) =
# p(y)^16 with y = max(x, -16) / 16 in [-1, 0] and p a degree-5 polynomial fitted to e^y
# for RELATIVE error (6.7e-7 on [-1, 0]; the 4 squarings multiply it by 16): max relative
# error 1.1e-5 on [-16, 0], and below -16 the value is e^-16 (1.1e-7, under half an ulp of
# FM64's 18 fraction bits) instead of smaller. A relative error that is nearly uniform
# cancels in softmax's normalisation. Cost under ABY3 FM64, measured: 1,028 B and 39.7
# rounds per element (one comparison and select for the clip, one truncation for the
# scale, Horner's 1 public + 4 secret products, 4 squarings) against SPU's PADE exp at
# 1,936 B and 71 rounds (SEMI2K: 592 B and 27 rounds), and SPU's Taylor exp
# ((1 + x/256)^256, no clip) at 768 B and 26 rounds but 1.1e-3 absolute error and garbage
# below -512. Under MPC the squarings also multiply each truncation's error: 1.4e-4
# absolute at most against exp (PADE: 8.7e-5). Fit (reproduce): iteratively reweighted
# least squares on 20,001 Chebyshev nodes of [-1, 0], basis 1..y^5, target e^y with weight
# e^-y (relative error), weights w <- w (1 + e / max e), 300 iterations, the best max
# error kept.
EXP_CLIP = 16.0
EXP_SQUARINGS = 4
#: p's coefficients, increasing powers of y.
EXP_POLY = (0.999999327003, 0.999957515897, 0.499543064242, 0.164803922256,
            0.0381077168014, 0.00500947630331)  # fmt: skip


def exp_nonpositive(x: jnp.ndarray) -> jnp.ndarray:
    """exp(x) for x <= 0 (softmax after its max subtraction), relative error <= 1.1e-5 on
    [-16, 0]; see the comment above for the cost. Positive x is not supported: the
    caller guarantees x <= 0."""
    y = jnp.maximum(x, -EXP_CLIP) * (1.0 / 2**EXP_SQUARINGS)
    r = jnp.polyval(jnp.asarray(EXP_POLY[::-1], x.dtype), y)
    for _ in range(EXP_SQUARINGS):
        r = r * r
    return r


# ------------------------------------------------------------------- batched matmuls
#
# SPU 0.9.3 runs a dot_general with batch dimensions as a loop over the batch, one matmul
# (and its truncation) after the other: about 3 rounds per batch element under ABY3, so
# attention's [batch x heads] products cost ~150 rounds per einsum at batch 2 x 12 heads
# x population 2. `packed_matmul` computes the same G products as ONE 2-D matmul: the left
# operands are placed on the diagonal blocks of a [G M, G K] matrix (a select on a public
# mask: local) and the right operands stacked into [G K, N]. The off-diagonal blocks are
# exact zeros, so the result is exact. Communication is the same as the loop's (ABY3 and
# SEMI2K send only the [G M, N] product and its truncation; the inner dimension is local)
# but the rounds are one matmul's. The price is local work: G^2 M K N multiply-adds
# instead of G M K N, so large products are packed in groups (`PACK_LIMIT`).

#: Max multiply-adds of one packed matmul (per share product). Above it, the G products are
#: packed in equal groups (the largest divisor of G that fits), looped over by SPU.
PACK_LIMIT = 2**27


def pack_group_size(g: int, work: int, limit: int = PACK_LIMIT) -> int:
    """Largest divisor s of g with s^2 * work <= limit (at least 1); work = M K N."""
    fits = [s for s in range(1, g + 1) if g % s == 0 and s * s * work <= limit]
    return max(fits, default=1)


def packed_matmul(a: jnp.ndarray, b: jnp.ndarray, limit: int = PACK_LIMIT) -> jnp.ndarray:
    """[G, M, K] @ [G, K, N] -> [G, M, N], as few 2-D matmuls as `limit` allows."""
    g, m, k = a.shape
    n = b.shape[-1]
    s = pack_group_size(g, m * k * n, limit)
    if s == 1:
        return jnp.einsum("gmk,gkn->gmn", a, b)
    c = g // s
    block = np.eye(s, dtype=bool)[None, :, None, :, None]  # [1, s, 1, s, 1], public
    a5 = a.reshape(c, s, m, 1, k)
    diag = jnp.where(block, a5, jnp.zeros_like(a5)).reshape(c, s * m, s * k)
    stacked = b.reshape(c, s * k, n)
    out = diag[0] @ stacked[0] if c == 1 else jnp.einsum("cmk,ckn->cmn", diag, stacked)
    return out.reshape(g, m, n)


def sum_of_squares(x: jnp.ndarray) -> jnp.ndarray:
    """sum(x * x) over the last axis: [..., D] -> [..., 1].

    Elementwise x * x costs a product AND a truncation per element under MPC (ABY3 FM64:
    88 B per element, measured); a matmul truncates once per OUTPUT, after accumulating.
    So when the R rows are fewer than D / 2, the sums are the diagonal of the one Gram
    matrix X X^T [R, R] (R^2 outputs instead of R D products; the diagonal is a select on
    a public mask: local), e.g. a BERT-base LayerNorm at 128 tokens: 8.65 -> 1.44 MB.
    Otherwise elementwise. (Smaller Gram blocks would need packing whose [M, big K] x
    [big K, few] products SPU 0.9.3 computes 15x slower than square ones, or a loop with
    rounds per block.) More precise too: one truncation after the sum, not D before it."""
    lead, d = x.shape[:-1], x.shape[-1]
    rows = int(np.prod(lead))
    if 2 * rows >= d:
        return jnp.sum(x * x, axis=-1, keepdims=True)
    flat = x.reshape(rows, d)
    gram = flat @ flat.T
    diag = jnp.sum(jnp.where(np.eye(rows, dtype=bool), gram, jnp.zeros_like(gram)), axis=-1)
    return diag.reshape(*lead, 1)


def heads_matmul(a: jnp.ndarray, b: jnp.ndarray, spec: str) -> jnp.ndarray:
    """`jnp.einsum(spec, a, b)` for attention's per-(batch, head) products, packed.

    spec is "lhs,rhs->out" over the letters b (batch), h (head) and three more: one free
    in each operand and one contracted, e.g. "bqhd,bkhd->bhqk". Leading axes beyond the
    spec's (a vmap's population axis) are not allowed here; vmap adds them outside.
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    (contract,) = set(lhs) & set(rhs) - {"b", "h"}
    (free_l,) = set(lhs) - {"b", "h", contract}
    (free_r,) = set(rhs) - {"b", "h", contract}
    a3 = jnp.einsum(f"{lhs}->bh{free_l}{contract}", a)
    b3 = jnp.einsum(f"{rhs}->bh{contract}{free_r}", b)
    bsz, h = a3.shape[:2]
    prod = packed_matmul(a3.reshape(bsz * h, *a3.shape[2:]), b3.reshape(bsz * h, *b3.shape[2:]))
    prod = prod.reshape(bsz, h, *prod.shape[1:])
    return jnp.einsum(f"bh{free_l}{free_r}->{out}", prod)
