"""Numerics that stay accurate under MPC fixed point and are exact in floating point.

Under SPU (FM64, 18 fraction bits) every value has an absolute precision of 2^-18 (about
3.8e-6), every secret product is truncated with a bias of up to half an ulp, and
reciprocal / rsqrt are approximations (measured here, SEMI2K FM64: reciprocal up to 7e-4
relative error on [2, 200], rsqrt up to 3e-4 on [0.01, 100]). These helpers rearrange the
maths so that small intermediates are never materialised and one Newton step squares the
approximation error. In floating point they compute the same values as the textbook forms.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

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
    batched einsum, which SPU runs as a loop with 2 rounds per row). The rsqrt is
    `rsqrt_pow2`, with sqrt(n) folded into its public output constants and the product
    c * scale (independent of it) fused into one of its multiply ops: one op fewer.
    """
    n = x.shape[-1]
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    sum_sq = sum_of_squares(centred)
    inv_std, scaled = rsqrt_pow2(sum_sq + n * eps, scale=float(np.sqrt(n)), also=(centred, scale))
    return scaled * inv_std + bias


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
    one AND and one stacked select. The selects are exact in the ring, so the
    polynomial's (possibly wrapped-around) value far outside [-B, B] never leaks into the
    result.
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
    inside = ~above & ~below
    # Both selects in one op (and one boolean AND): x where x > B, the polynomial where
    # |x| <= B, 0 elsewhere; the cases exclude each other, so the sum picks one.
    picked = jnp.where(jnp.stack([above, inside]), jnp.stack([x, inner]), jnp.zeros((), x.dtype))  # fmt: skip
    return picked[0] + picked[1]


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
# cancels in softmax's normalisation. Cost under ABY3 FM64, measured: 1,004 B and 35.7
# rounds per element (one comparison and select for the clip, one truncation for the
# scale, the powers y^2..y^5 in 3 secret products and their public combination in one
# truncation, 4 squarings; Horner's chain was 1,028 B and 39.7 rounds) against SPU's PADE
# exp at 1,936 B and 71 rounds (SEMI2K: 560 B and 24 rounds), and SPU's Taylor exp
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
    # p(y) from the powers y..y^5 (3 secret products: y^2, [y^3, y^4] stacked, y^5) and ONE
    # public combination: 3 rounds fewer than Horner's chain, the same bytes.
    y = jnp.maximum(x, -EXP_CLIP) * (1.0 / 2**EXP_SQUARINGS)
    y2 = y * y
    y3, y4 = jnp.stack([y2, y2]) * jnp.stack([y, y2])
    powers = jnp.stack([y, y2, y3, y4, y4 * y], axis=-1)
    r = powers @ jnp.asarray(EXP_POLY[1:], x.dtype) + EXP_POLY[0]
    for _ in range(EXP_SQUARINGS):
        r = r * r
    return r


# ------------------------------------------------------------------- batched matmuls
#
# SPU 0.9.3 runs a dot_general with batch dimensions as a loop over the batch, one matmul
# (and its truncation) after the other: about 3 rounds per batch element under ABY3, so
# attention's [batch x heads] products cost ~150 rounds per einsum at batch 2 x 12 heads
# x population 2. `packed_matmul` computes the same G products as ONE 2-D matmul: the left
# operands are placed on the diagonal blocks of a [G M, G K] matrix (`block_diagonal`, data
# movement: local) and the right operands stacked into [G K, N]. The off-diagonal blocks are
# exact zeros, so the result is exact. Communication is the same as the loop's (ABY3 and
# SEMI2K send only the [G M, N] product and its truncation; the inner dimension is local)
# but the rounds are one matmul's. The price is local work: G^2 M K N multiply-adds
# instead of G M K N, so large products are packed in groups (`PACK_LIMIT`).
#
# That holds where a secret product pays per OUTPUT (ABY3 reshares the product). SEMI2K's
# Beaver products pay per OPERAND: both operands are opened (x - a, y - b, 16 B per element
# over two parties), and an exact truncation adds 16 B per output. The left block-diagonal
# is then opened whole, zeros included: S^2 M K elements instead of S M K, which at 512
# tokens made RFA's two head products cost 109 MB a layer instead of about 33. So the
# layout is chosen by the protocol's price (`MatmulPrice`, `packed_layout`): the left
# operand on the diagonal ("left"), the right one ("right"), or neither ("cross": the
# stacked operands multiplied whole, every (i, j) pair of blocks, and the S diagonal
# blocks sliced out, which costs S^2 M N outputs and no zero opened). Every layout gives
# the same values and the same rounds (one matmul).

#: Max multiply-adds of one packed matmul (per share product). Above it, the G products are
#: packed in equal groups (the largest divisor of G that fits), looped over by SPU.
PACK_LIMIT = 2**27


def pack_group_size(g: int, work: int, limit: int = PACK_LIMIT) -> int:
    """Largest divisor s of g with s^2 * work <= limit (at least 1); work = M K N."""
    fits = [s for s in range(1, g + 1) if g % s == 0 and s * s * work <= limit]
    return max(fits, default=1)


def block_diagonal(blocks: jnp.ndarray) -> jnp.ndarray:
    """[C, S, M, K] -> [C, M S, S K]: each group's S blocks on the diagonal, zeros elsewhere,
    rows in (m, s) order (row r of block i is row r S + i; `packed_matmul` reorders the
    product's rows back).

    One pad, no product: with the block axis innermost but for K, interior padding puts S
    zero K-vectors between neighbouring blocks, which leaves block i at (i, i) of an
    [S, S] grid. A select on a public diagonal mask gives the same values, but under SPU
    it is a secret-times-public product over all S^2 M K elements: measured on the main
    run's trunk (S = 48), 55 s of its 172 s."""
    c, s, m, k = blocks.shape
    rows = blocks.transpose(0, 2, 1, 3)  # [C, M, S, K]: small, G M K elements
    spread = jax.lax.pad(rows, jnp.zeros((), blocks.dtype), [(0, 0, 0), (0, 0, 0), (0, 0, s), (0, 0, 0)])  # fmt: skip
    return spread.reshape(c, m * s, s * k)


@dataclasses.dataclass(frozen=True)
class MatmulPrice:
    """What one secret x secret matmul costs a protocol: bytes per element of the two
    operands (opened by a Beaver product) and per element of the output (resharing, or a
    truncation). Only the ratio matters: it picks `packed_layout`."""

    operand: float
    output: float


#: ABY3 (and the default): a product reshares and truncates its output; the inner
#: dimension is local, so operands cost nothing.
PRICE_PER_OUTPUT = MatmulPrice(operand=0.0, output=1.0)
#: SEMI2K with exact truncation: both operands opened (16 B per element over two
#: parties), the output truncated (16 B).
PRICE_BEAVER = MatmulPrice(operand=16.0, output=16.0)
#: SEMI2K with probabilistic truncation: each party truncates its own share, so outputs
#: are free.
PRICE_BEAVER_LOCAL_TRUNCATION = MatmulPrice(operand=16.0, output=0.0)

LAYOUTS = ("left", "right", "cross")


def layout_costs(s: int, m: int, k: int, n: int, price: MatmulPrice) -> dict[str, float]:
    """Priced elements of one packed group of S products [M, K] @ [K, N], per layout:
    (operand elements opened, output elements) weighted by `price`."""
    left = (s * s * m * k + s * k * n, s * m * n)
    right = (s * m * k + s * s * k * n, s * m * n)
    cross = (s * m * k + s * k * n, s * s * m * n)
    return {name: price.operand * ops + price.output * outs
            for name, (ops, outs) in zip(LAYOUTS, (left, right, cross), strict=True)}  # fmt: skip


def packed_layout(s: int, m: int, k: int, n: int, price: MatmulPrice = PRICE_PER_OUTPUT) -> str:
    """The cheapest layout at `price` (ties go to "left", the per-output choice)."""
    costs = layout_costs(s, m, k, n, price)
    return min(LAYOUTS, key=lambda name: costs[name])


def packed_matmul(
    a: jnp.ndarray,
    b: jnp.ndarray,
    limit: int = PACK_LIMIT,
    price: MatmulPrice = PRICE_PER_OUTPUT,
    layout: str | None = None,
) -> jnp.ndarray:
    """[G, M, K] @ [G, K, N] -> [G, M, N], as few 2-D matmuls as `limit` allows, in the
    layout cheapest at `price` (or `layout`, forced; see the comment above)."""
    g, m, k = a.shape
    n = b.shape[-1]
    s = pack_group_size(g, m * k * n, limit)
    if s == 1:
        return jnp.einsum("gmk,gkn->gmn", a, b)
    layout = packed_layout(s, m, k, n, price) if layout is None else layout
    c = g // s
    matmul = lambda x, y: x[0] @ y[0] if c == 1 else jnp.einsum("cmk,ckn->cmn", x, y)  # noqa: E731
    if layout == "left":  # [C, M S, S K] @ [C, S K, N] -> rows in (m, s) order
        out = matmul(block_diagonal(a.reshape(c, s, m, k)), b.reshape(c, s * k, n))
        return out.reshape(c, m, s, n).transpose(0, 2, 1, 3).reshape(g, m, n)
    if layout == "right":  # [C, M, K S] (columns in (k, s) order) @ [C, K S, S N]
        cols = a.reshape(c, s, m, k).transpose(0, 2, 3, 1).reshape(c, m, k * s)
        out = matmul(cols, block_diagonal(b.reshape(c, s, k, n)))
        return out.reshape(c, m, s, n).transpose(0, 2, 1, 3).reshape(g, m, n)
    if layout == "cross":  # [C, S M, K] @ [C, K, S N]: every pair, then the S diagonal blocks
        cols = b.reshape(c, s, k, n).transpose(0, 2, 1, 3).reshape(c, k, s * n)
        full = matmul(a.reshape(c, s * m, k), cols).reshape(c, s, m, s, n)
        return jnp.stack([full[:, i, :, i, :] for i in range(s)], axis=1).reshape(g, m, n)
    raise ValueError(f"layout: unknown {layout!r}; expected one of {LAYOUTS}")


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
    """`jnp.einsum(spec, a, b)` for attention's per-(batch, head) products.

    spec is "lhs,rhs->out" over the letters b (batch), h (head) and three more: one free
    in each operand and one contracted, e.g. "bqhd,bkhd->bhqk". The product is ONE
    dot_general with batch dimensions; compiling for MPC packs it into one 2-D matmul
    (`packed_matmul`) in the layout the protocol prices cheapest, by the default
    ``packed_batch_dot`` rewrite (`secfwt_jax.compile.precision`), which knows the
    protocol. A vmap's population axis joins the batch dimensions there.
    """
    lhs, rest = spec.split(",")
    rhs, _ = rest.split("->")
    (contract,) = set(lhs) & set(rhs) - {"b", "h"}
    if len(set(lhs) - {"b", "h", contract}) != 1 or len(set(rhs) - {"b", "h", contract}) != 1:
        raise ValueError(f"spec: {spec!r} needs one free letter in each operand besides b and h")  # fmt: skip
    return jnp.einsum(spec, a, b)


# ---------------------------------------------------- reciprocal, rsqrt and log
#
# SPU 0.9.3's reciprocal and rsqrt normalise x by locating its most significant bit (a
# bit decomposition and a prefix-OR) before a polynomial and Newton steps: 53 and 51
# rounds under ABY3, and the project's Newton step adds 6-9. Here the normalisation is
# ONE comparison op: x against every public power of two 2^j, j = lo..hi, side by side
# (8 rounds under ABY3, whatever the count). Neighbouring bits XOR to a one-hot bucket
# (local), and the per-bucket public constants (the normaliser 2^-j, the output's 2^-j
# or 2^(-j/2), the log's j ln 2) come from one product of the one-hot with a public
# table (one truncation): exactly one term is non-zero, so each constant is exact. Then
# u = x 2^-j lies in [1, 2), where a quadratic starts and a short series finishes;
# independent products are stacked into one multiply op, which costs one op's rounds. Below 2^lo (zero and negative x included)
# and from 2^hi up, u = 1 and the result is that of 2^lo or 2^hi: the functions saturate
# instead of extrapolating a polynomial into fixed-point overflow. Costs and errors:
# docs/cost.md, section 8.

#: Relative-minimax quadratics on [1, 2] (increasing powers), fitted like EXP_POLY:
#: 1/u (max relative error 1.0e-2) and 1/sqrt(u) (3.2e-3).
RECIPROCAL_POLY = (2.12121134, -1.45454437, 0.32323197)
RSQRT_POLY = (1.57963884, -0.73051397, 0.14768747)
#: log(1 + t) = t q(t) on [0, 1], q of degree 5 (increasing powers), fitted for absolute
#: error like EXP_POLY: max 1.4e-6, exactly 0 at t = 0 (so the saturated ends are exact).
LOG1P_OVER_T = (0.999901645068, -0.497875084088, 0.317649104078, -0.193761046337,
                0.0855700262362, -0.0183388983345)  # fmt: skip
#: Largest j for which 2^-j is a fixed-point constant (FM64, 18 fraction bits).
SINGLE_STEP_MAX = 18


def sums_bound(count: int) -> int:
    """hi of `reciprocal_pow2` / `divide_pow2` for a sum of ``count`` terms each at most 1
    (attention's denominators, token counts), with slack."""
    return int(np.ceil(np.log2(count))) + 1


def power_of_two_bucket(
    x: jnp.ndarray, lo: int, hi: int, tables: np.ndarray, *, odd: Sequence[bool] | None = None
) -> jnp.ndarray:
    """Per-bucket public constants selected by x's power-of-two bucket: [T, *x.shape].

    tables: [T, hi - lo + 2] public values, columns: x < 2^lo, then x in [2^j, 2^(j+1))
    for j = lo .. hi - 1, then x >= 2^hi. With ``odd`` (one flag per table), -x is
    compared in the same op too: x <= -2^lo gets its |x| bucket's constants, negated in
    the tables flagged odd, and the first column covers |x| < 2^lo only. One comparison
    op, local XORs, one local product with the public tables (and its truncation).
    """
    signed = odd is not None
    thresholds = (2.0 ** np.arange(lo, hi + 1)).astype(np.float32)
    tab = np.asarray(tables, np.float64)
    sides = jnp.stack([x, -x], axis=-1) if signed else x[..., None]
    bits = sides[..., None] >= thresholds  # [..., S, K], bits[k] >= bits[k + 1]
    ones = jnp.ones(bits.shape[:-1] + (1,), bool)
    ext = jnp.concatenate([ones, bits, ~ones], axis=-1)
    onehot = ext[..., :-1] ^ ext[..., 1:]  # [..., S, K + 1] booleans
    if signed:  # column 0 of each side is "below 2^lo"; below on both is |x| < 2^lo
        middle = onehot[..., 0, :1] & onehot[..., 1, :1]
        onehot = jnp.concatenate([middle, onehot[..., 0, 1:], onehot[..., 1, 1:]], axis=-1)
        flip = np.where(np.asarray(odd, bool), -1.0, 1.0)[:, None]
        tab = np.concatenate([tab, flip * tab[:, 1:]], axis=1)
    else:
        onehot = onehot[..., 0, :]
    table = jnp.asarray(tab.T.astype(np.float32), x.dtype)
    return jnp.moveaxis(onehot.astype(x.dtype) @ table, -1, 0)


def _normalisers(lo: int, hi: int) -> list[np.ndarray]:
    """Factors whose product maps bucket j to u = x 2^-j in [1, 2) (0 with u = 1 added at
    the saturated ends): one factor while 2^-(hi-1) is a fixed-point constant, else two
    (2^-ceil(j/2) then 2^-floor(j/2)), so that no factor underflows and no intermediate
    drops below 1."""
    j = np.arange(lo, hi)
    if hi - 1 <= SINGLE_STEP_MAX:
        steps = [2.0**-j]
    else:
        first = np.where(j <= 0, 2.0**-j, 2.0 ** -np.ceil(j / 2))
        steps = [first, np.where(j <= 0, 1.0, 2.0 ** -np.floor(j / 2))]
    return [np.concatenate([[0.0], s, [0.0]]) for s in steps]


def _saturated(lo: int, hi: int) -> np.ndarray:
    """1 in the two saturated buckets, 0 elsewhere: added to u there."""
    return np.concatenate([[1.0], np.zeros(hi - lo), [1.0]])


def _edges(values_in_range: np.ndarray, below, above) -> np.ndarray:
    return np.concatenate([[below], values_in_range, [above]])


def _check_range(name: str, lo: int, hi: int) -> None:
    if not lo < hi <= 2 * SINGLE_STEP_MAX:
        raise ValueError(f"{name}: need lo < hi <= {2 * SINGLE_STEP_MAX}, got lo={lo}, hi={hi}")


def _normalise(x, lo, hi, out_tables, signed=False):
    """u in [1, 2) and the requested output constants (one comparison op for all).

    (Folding a polynomial's leading coefficient c into a normalising factor, x (c 2^-j),
    would save its truncation op but loses the precision of c 2^-j for large j.)"""
    norms = _normalisers(lo, hi)
    tables = np.stack([*norms, _saturated(lo, hi), *out_tables])
    # signed: u stays positive (the first factor takes x's sign), the outputs are odd
    odd = [True] + [False] * len(norms) + [True] * len(out_tables) if signed else None
    consts = power_of_two_bucket(x, lo, hi, tables, odd=odd)
    u = x
    for factor in consts[: len(norms)]:
        u = u * factor
    return u + consts[len(norms)], consts[len(norms) + 1 :]


def _quadratic(coeffs, u):
    c0, c1, c2 = coeffs
    return (c2 * u + c1) * u + c0


def reciprocal_pow2(
    x: jnp.ndarray, lo: int = -16, hi: int = 24, scale: float = 1.0, *, signed: bool = False
):
    """scale / x for x in [2^lo, 2^hi) (and, with ``signed``, in (-2^hi, -2^lo]: the same
    rounds, twice the comparisons), saturating outside (see the comment above).

    r0 = quadratic(u) has relative error e0 <= 1e-2; with e = 1 - u r0,
    1/u = r0 (1 + e)(1 + e^2) + O(e^4): three stacked multiply ops, error ~1e-8.
    """
    _check_range("reciprocal_pow2", lo, hi)
    rs, e = _reciprocal_start(x, lo, hi, scale, signed)
    a, e2 = jnp.stack([rs, e]) * jnp.stack([1.0 + e, e])
    return a * (1.0 + e2)


def _reciprocal_start(x, lo, hi, scale, signed):
    """(rs, e): rs = scale 2^-j r0 (the quadratic's scale / x) and e = 1 - u r0."""
    j = np.arange(lo, hi)
    out = scale * _edges(2.0**-j, 2.0**-lo, 2.0**-hi)
    u, (sd,) = _normalise(x, lo, hi, [out], signed)
    r0 = _quadratic(RECIPROCAL_POLY, u)
    ur, rs = jnp.stack([u, sd]) * r0[None]
    return rs, 1.0 - ur


def divide_pow2(num, den, lo: int = -16, hi: int = 24, *, signed: bool = False):
    """num / den with den's reciprocal as in `reciprocal_pow2` (den broadcast against num,
    e.g. attention's [..., 1] normalisers against [..., D] outputs), one op shorter:
    num r0 (1 + e + e^2) with num's product fused into the e^2 op. Relative error
    <= e^3 <= 1.0e-6 (the quadratic's 1e-2 cubed) instead of ~1e-8."""
    _check_range("divide_pow2", lo, hi)
    rs, e = _reciprocal_start(den, lo, hi, 1.0, signed)
    scaled, e2 = fused_multiply((num, rs), (e, e))
    return scaled * (1.0 + e + e2)


def rsqrt_pow2(x: jnp.ndarray, lo: int = -16, hi: int = 32, scale: float = 1.0, also=None):
    """scale / sqrt(x) for x in [2^lo, 2^hi), saturating outside (see the comment above).

    y0 = quadratic(u) has relative error <= 3.2e-3; with e = 1 - u y0^2,
    1/sqrt(u) = y0 (1 + e/2 + 3 e^2 / 8) + O(e^3): four multiply ops (the 1/2 and 3/8 are
    folded into the public output constants), error ~1e-8. ``also=(a, b)``: the product a * b
    (any shapes) is computed inside one of those ops and returned as a second result.
    """
    _check_range("rsqrt_pow2", lo, hi)
    j = np.arange(lo, hi)
    out = scale * _edges(2.0 ** (-j / 2), 2.0 ** (-lo / 2), 2.0 ** (-hi / 2))
    u, (half, three_eighths) = _normalise(x, lo, hi, [0.5 * out, 0.375 * out])
    y0 = _quadratic(RSQRT_POLY, u)
    if also is None:
        uy, yh, yt = jnp.stack([u, half, three_eighths]) * y0[None]
    else:
        (uy, yh, yt), extra = fused_multiply((jnp.stack([u, half, three_eighths]), y0[None]), also)  # fmt: skip
    e = 1.0 - uy * y0
    a, b = jnp.stack([yh, yt]) * jnp.stack([2.0 + e, e])
    return a + b * e if also is None else (a + b * e, extra)


def fused_multiply(*pairs):
    """[a * b for (a, b) in pairs] as ONE elementwise multiply op (operands broadcast,
    flattened and concatenated; scalars allowed): independent products cost one op's
    rounds under MPC."""
    shapes = [jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b)) for a, b in pairs]
    lhs = jnp.concatenate([jnp.broadcast_to(a, sh).ravel() for (a, _), sh in zip(pairs, shapes, strict=True)])  # fmt: skip
    rhs = jnp.concatenate([jnp.broadcast_to(b, sh).ravel() for (_, b), sh in zip(pairs, shapes, strict=True)])  # fmt: skip
    out = lhs * rhs
    sizes = np.cumsum([int(np.prod(sh)) for sh in shapes])[:-1]
    return [part.reshape(sh) for part, sh in zip(jnp.split(out, sizes), shapes, strict=True)]


def log_pow2(x: jnp.ndarray, lo: int = 0, hi: int = 8, also=None):
    """log(x) for x in [2^lo, 2^hi), saturating outside: j ln 2 + t q(t) with t = u - 1
    (max abs error 1.4e-6). One octave (hi = lo + 1) needs no comparison: [2^lo, 2^hi]
    closed, and values just outside extrapolate smoothly instead of saturating.
    ``also=(a, b)``: a * b is returned second, computed inside its last product op."""
    _check_range("log_pow2", lo, hi)
    if hi == lo + 1:  # one octave: no comparison; just outside it t q(t) extrapolates
        t = (x if lo == 0 else x * 2.0**-lo) - 1.0
        return _log_tail(lo * np.log(2.0), t, also)
    j = np.arange(lo, hi)
    offsets = _edges(j * np.log(2.0), lo * np.log(2.0), hi * np.log(2.0))
    u, (offset,) = _normalise(x, lo, hi, [offsets])
    return _log_tail(offset, u - 1.0, also)


def _log_tail(offset, t, also):
    """offset + t q(t), and ``also``'s product fused into the last op."""
    q = jnp.polyval(jnp.asarray(LOG1P_OVER_T[::-1], t.dtype), t)
    if also is None:
        return offset + t * q
    tq, extra = fused_multiply((t, q), also)
    return offset + tq, extra


# ----------------------------------------------------------------- max over keys
#
# SPU 0.9.3's max-reduce is a binary tournament: one comparison and one select per level,
# 11 rounds under ABY3, log2(n) levels (44 rounds for 16 keys). A radix-4 tournament
# compares all 6 pairs of each group of 4 in ONE comparison op, ANDs each member's 3
# wins (2 levels of local-ish boolean ANDs) and keeps the winner by one select: one level
# replaces two binary ones. Ties go to the lower index, so exactly one member wins.


def _winners(c: jnp.ndarray, r: int) -> jnp.ndarray:
    """[..., r] one-hot of each group's max from c [..., r(r-1)/2] = [g_i >= g_j], i < j."""
    pairs = list(zip(*np.triu_indices(r, 1), strict=True))
    wins = []
    for i in range(r):
        row = [c[..., p] if a == i else ~c[..., p] for p, (a, b) in enumerate(pairs) if i in (a, b)]
        wins.append(jnp.stack(row, axis=-1))
    return jnp.all(jnp.stack(wins, axis=-2), axis=-1)


def max_last_axis(x: jnp.ndarray, radix: int = 4) -> jnp.ndarray:
    """max over the last axis, kept as a trailing axis of size 1: the same value as
    `jnp.max(x, -1, keepdims=True)`, in a radix-4 tournament (see the comment above)."""
    while x.shape[-1] > 1:
        n = x.shape[-1]
        r = min(radix, n)
        if n % r:  # pad with copies of the first member: the max is unchanged
            x = jnp.concatenate([x, jnp.broadcast_to(x[..., :1], x.shape[:-1] + (r - n % r,))], -1)  # fmt: skip
        groups = x.reshape(x.shape[:-1] + (x.shape[-1] // r, r))
        i, j = np.triu_indices(r, 1)
        wins = _winners(groups[..., i] >= groups[..., j], r)
        x = jnp.sum(jnp.where(wins, groups, jnp.zeros((), x.dtype)), axis=-1)
    return x


# ------------------------------------------------------------------------------- SiLU
#
# SiLU(x) = x sigmoid(x) = x / 2 + g(x) with g(x) = (x / 2) tanh(x / 2) EVEN, and
# |SiLU(x) - relu(x)| = |x| sigmoid(-|x|) <= B e^-B for |x| >= B. So, as for GeLU, relu
# outside [-B, B] and one even polynomial in t = 2 (x / B)^2 - 1 inside, in the Chebyshev
# basis (intermediates in [-1, 1]). SiLU's tail decays like e^-|x| rather than GeLU's
# e^-x^2/2, so B is wider and the degree higher. Fits (iteratively reweighted least
# squares to near-minimax on 20,001 Chebyshev nodes of [-B, B], 200 iterations, as
# `silu_chebyshev` does at import); max error over the real line:
#   "piecewise":      B = 10, degree 12 in t: 5.5e-4 inside, 4.5e-4 at the switch points;
#   "piecewise_lite": B = 8, degree 6 in t:   8.7e-3 inside, 2.7e-3 at the switch points.
SILU_FORMS: dict[str, tuple[float, int]] = {"piecewise": (10.0, 12), "piecewise_lite": (8.0, 6)}


@functools.cache
def silu_chebyshev(bound: float, degree: int) -> tuple[float, ...]:
    """Chebyshev coefficients c_0..c_degree of g(x) = SiLU(x) - x / 2 in t = 2 (x/B)^2 - 1."""
    x = bound * np.cos(np.linspace(0.0, np.pi, 20001))
    t = 2.0 * (x / bound) ** 2 - 1.0
    g = x / (1.0 + np.exp(-x)) - x / 2.0
    weights, best = np.ones_like(x), (np.inf, None)
    for _ in range(200):
        coeffs = np.polynomial.chebyshev.chebfit(t, g, degree, w=np.sqrt(weights))
        err = np.abs(np.polynomial.chebyshev.chebval(t, coeffs) - g)
        if err.max() < best[0]:
            best = (err.max(), coeffs)
        weights = weights * (1.0 + err / err.max())
    return tuple(float(c) for c in best[1])


def chebyshev_basis(t: jnp.ndarray, degree: int) -> jnp.ndarray:
    """[T_1(t), ..., T_degree(t)] stacked on a new leading axis, by doubling: with T_1..T_m
    known, T_(m+j) = 2 T_m T_j - T_(m-j) for j = 1..m, one stacked product per level, so
    degree 12 takes 4 product ops (11 products) instead of 11 sequential ones."""
    basis = [jnp.ones_like(t), t]  # T_0, T_1
    while len(basis) <= degree:
        m = len(basis) - 1
        js = list(range(1, min(m, degree - m) + 1))
        products = basis[m] * jnp.stack([basis[j] for j in js])
        basis += [2.0 * products[i] - basis[m - j] for i, j in enumerate(js)]
    return jnp.stack(basis[1 : degree + 1])


def silu_piecewise(x: jnp.ndarray, form: str = "piecewise") -> jnp.ndarray:
    """SiLU as two comparisons and one even polynomial (see `SILU_FORMS`), any shape.

    The structure is `gelu_piecewise`'s: one stacked comparison [x > B, -x > B], the
    Chebyshev basis of t = 2 (x / B)^2 - 1, one public dot, one AND and one stacked select
    (exact in the ring, so the polynomial's value far outside [-B, B] never leaks in).
    """
    bound, degree = SILU_FORMS[form]
    coeffs = np.asarray(silu_chebyshev(bound, degree), np.float32)
    s = x * (1.0 / bound)
    sq = s * s
    t = sq + sq - 1.0
    basis = chebyshev_basis(t, degree)
    inner = jnp.tensordot(jnp.asarray(coeffs[1:], x.dtype), basis, axes=1) + (coeffs[0] + 0.5 * x)  # fmt: skip
    above, below = jnp.stack([x, -x]) > bound
    inside = ~above & ~below
    picked = jnp.where(jnp.stack([above, inside]), jnp.stack([x, inner]), jnp.zeros((), x.dtype))  # fmt: skip
    return picked[0] + picked[1]
