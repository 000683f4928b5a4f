"""Attention kernels: softmax (the reference) and random feature attention (RFA).

Shapes: q, k, v are [batch, seq, heads, head_dim]; `key_mask` is [batch, seq] with 1.0 for
real tokens and 0.0 for padding. Both kernels mask MULTIPLICATIVELY. Hugging Face adds a
`finfo(dtype).min` bias to padded scores; under MPC fixed point (FM64, 18 fraction bits,
range about +-2^45) that constant does not exist, so no additive mask appears here.

RFA replaces softmax(q k^T) v by phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1): no n-by-n
exp or max, and n divisions instead of n^2. Padded keys have their features zeroed.
Causal RFA (GPT-2) uses prefix sums over the sequence, which are local under MPC.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.feature_maps import (
    direction_bound,
    feature_width,
    inverse_norm,
    positive_features,
    random_directions,
    trig_features,
)
from secfwt_jax.models.mpc_ops import (
    divide_pow2,
    exp_nonpositive,
    fused_multiply,
    heads_matmul,
    max_last_axis,
    refined_reciprocal,
    sums_bound,
)


def causal_mask(seq_len: int) -> np.ndarray:
    """Public lower-triangular [seq, seq] 0/1 mask (query row, key column)."""
    return np.tril(np.ones((seq_len, seq_len), dtype=np.float32))


def softmax_attention(q, k, v, key_mask, *, causal: bool = False, exp: str = "exact"):
    """Softmax attention, padded keys masked: [B, N, H, D] -> [B, N, H, D].

    The row max is taken over all keys; any per-row constant leaves softmax unchanged and
    this one keeps every exp argument <= 0, which SPU's exp and `exp_nonpositive` (``exp=
    "poly"``, see `config.ExpImpl`) need. The two per-(batch,
    head) products are packed into single matmuls (`mpc_ops.heads_matmul`), and the
    1/sqrt(d) scale (a truncation under MPC) goes on the smaller of q [N, D] and the
    scores [N, N].
    """
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / np.sqrt(head_dim)
    # With the clipped poly exp, padded keys are masked additively: -MASK_PENALTY on their
    # scores, computed in the same public product (one truncation op) as the scale, so
    # no secret product with the mask is needed (3 rounds fewer under ABY3); their
    # weights come out as e^-16, under half an ulp of 18 fraction bits. SPU's exp is not
    # trusted that far below 0, so "exact" keeps the multiplicative mask.
    additive = exp == "poly"
    penalty_pair = (key_mask - 1.0, MASK_PENALTY)
    if seq > head_dim:
        q, penalty = fused_multiply((q, scale), penalty_pair) if additive else (q * scale, None)
    scores = heads_matmul(q, k, "bqhd,bkhd->bhqk")
    if seq <= head_dim:
        scores, penalty = fused_multiply((scores, scale), penalty_pair) if additive else (scores * scale, None)  # fmt: skip
    if additive:
        scores = scores + penalty[:, None, None, :]
    weights = _exp(exp)(scores - max_last_axis(scores))
    if not additive:
        weights = weights * key_mask[:, None, None, :]
    if causal:
        weights = weights * causal_mask(q.shape[1])
    out = heads_matmul(weights, v, "bhqk,bkhd->bqhd")
    denom = jnp.sum(weights, axis=-1)  # [B, H, N], at most N (every weight <= 1)
    denom = jnp.transpose(denom, (0, 2, 1))[..., None]  # [B, N, H, 1]
    return divide_pow2(out, denom, DENOMINATOR_LO, sums_bound(k.shape[1]))


#: Subtracted from padded keys' scores (poly exp): far below the exp's clip at -16.
MASK_PENALTY = 1024.0

#: Attention denominators below 2^-16 saturate (`mpc_ops.reciprocal_pow2`): a row whose
#: every weight is under 2^-16 / N has no usable precision in 18 fraction bits anyway.
DENOMINATOR_LO = -16


def _exp(impl: str):
    """exp for arguments <= 0: `jnp.exp` ("exact") or `mpc_ops.exp_nonpositive` ("poly")."""
    return exp_nonpositive if impl == "poly" else jnp.exp


def _trig(x, w, cfg: AttentionConfig, *, guaranteed_bound: bool, row_scale=None):
    """Trig features; the poly path clips only when |w^T x| has no guaranteed bound, and a
    guaranteed bound is the one every layer shares (`feature_maps.direction_bound`)."""
    bound, at_least = cfg.poly_bound, 0.0
    if guaranteed_bound:
        num_heads, head_dim, _ = w.shape
        bound, at_least = None, direction_bound(cfg.seed, num_heads, head_dim, cfg.num_features, cfg.sigma)  # fmt: skip
    return trig_features(
        x, w, trig=cfg.trig, bound=bound, degree=cfg.poly_degree, row_scale=row_scale,
        bound_at_least=at_least, schedule=cfg.trig_schedule,
    )  # fmt: skip


def rfa_features(q, k, key_mask, cfg: AttentionConfig, layer: int):
    """Feature maps phi(q), phi(k) for one layer: [B, N, H, D] -> [B, N, H, F], padded
    keys' features zeroed (which removes them from RFA's numerator and denominator)."""
    phi_q, phi_k, _ = _unmasked_features(q, k, key_mask, cfg, layer)
    return phi_q, phi_k * key_mask[:, :, None, None]


def _unmasked_features(q, k, key_mask, cfg: AttentionConfig, layer: int, also=None):
    """phi(q), phi(k) of every token, padding included (the mask only keeps padded keys
    out of softmax_kernel's max over keys), and ``also``'s product (a, b) -> a * b, which
    the l2 variant computes inside its rsqrt's ops (one op fewer), the others apart.

    q and k are stacked on the token axis and mapped together: under MPC every op costs
    its rounds once instead of twice (the l2 normalisation's rsqrt alone is ~26 rounds).
    The token axis, not the batch axis, so that q may have fewer tokens than k (a decoder
    scoring one position, `llama.LlamaAttention`).
    """
    _, nq, num_heads, head_dim = q.shape
    w = random_directions(cfg.seed, layer, num_heads, head_dim, cfg.num_features, cfg.sigma)
    qk = jnp.concatenate([q, k], axis=1)
    if cfg.variant == "l2":
        # sin/cos of w^T (x / |x|), the 1/|x| applied after the projection (m products
        # per row, not D); |w^T x| / |x| <= |w| still bounds the argument.
        if also is None:
            inv, extra = inverse_norm(qk, impl=cfg.inverse), None
        else:  # (1 / |x|, a * b)
            inv, extra = inverse_norm(qk, also=also, impl=cfg.inverse)
        phi = _trig(qk, w, cfg, guaranteed_bound=True, row_scale=inv)
        return phi[:, :nq], phi[:, nq:], extra
    else:
        # exp(q.k / sqrt(d)) = exp(q'.k') with x' = x / d^(1/4).
        qks = qk * (1.0 / head_dim**0.25)
        if cfg.variant == "positive":
            phi = positive_features(qks, w, cfg.sigma)
            phi_q, phi_k = phi[:, :nq], phi[:, nq:]
        else:  # softmax_kernel
            phi = _trig(qks, w, cfg, guaranteed_bound=False)
            phi_q, phi_k = phi[:, :nq], phi[:, nq:]
            # Query magnitude factor cancels in the ratio. Key factor exp(|k'|^2 / 2 s^2) is
            # shifted by its max over real keys (a common factor, also cancels) to stay
            # bounded; padded keys count as |k'| = 0, so they neither set the max (which
            # would shrink every normaliser) nor overflow.
            ks = qks[:, nq:]
            sq = (0.5 / cfg.sigma**2) * jnp.sum(ks * ks, axis=-1, keepdims=True)
            sq = sq * key_mask[:, :, None, None].astype(sq.dtype)
            phi_k = phi_k * _exp(cfg.exp)(
                sq - jnp.moveaxis(max_last_axis(jnp.moveaxis(sq, 1, -1)), -1, 1)
            )
    return phi_q, phi_k, None if also is None else also[0] * also[1]


def scores_first(nq: int, nk: int, features: int, values: int) -> bool:
    """Whether RFA's two products cost fewer outputs in the order (phi(q) phi(k)^T) v.

    Both orders give the same sums. Under MPC a matmul's bytes (its reshare and
    truncation) are per OUTPUT, so the order goes by outputs per (batch, head): the key
    summary phi(k)^T v has F (D+1), the scores phi(q) phi(k)^T have Nq Nk, and both then
    give the Nq (D+1) result. Short inputs take the scores: MiniLM at 16 tokens, 256
    outputs against 2,112 (F = 64, D+1 = 33), with a third of the local work. BERT-base
    at 128 tokens and up keeps the key summary (128^2 against 128 x 65)."""
    return nq * nk < features * values


def random_feature_attention(
    q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False
):
    """RFA: phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1). [B, N, H, D] -> [B, N, H, D].

    v gets the key mask as an extra column, so numerator and denominator come out of the
    same two matmuls ([F, D+1] key summary, then [N, D+1]; or the [N, N] scores first when
    that has fewer outputs, `scores_first`), and only the N denominators are inverted.
    Causal RFA always takes the scores, under the public causal mask (local under MPC):
    the linear-time form's prefix sums of phi(k) v^T are N F (D+1) secret products.

    Padded keys are removed from both by masking whichever is narrower: phi(k)'s F
    features, or v's D values (then the extra column is the mask itself, free).
    The sums are the same; under MPC each masked value is one secret product, so at F =
    2m > D (m = 64 at d = 64, MiniLM's m = 32 at d = 32) masking v saves F - D per token.
    """
    mask = key_mask[:, :, None, None].astype(v.dtype)
    mask_v = feature_width(cfg.variant, cfg.num_features) >= v.shape[-1]
    phi_q, phi_k, masked_v = _unmasked_features(q, k, key_mask, cfg, layer, also=(v, mask) if mask_v else None)  # fmt: skip
    if mask_v:
        v = masked_v
    else:
        phi_k = phi_k * mask
        mask = jnp.ones_like(mask)
    v1 = jnp.concatenate([v, jnp.broadcast_to(mask, v.shape[:-1] + (1,))], axis=-1)
    if causal or scores_first(q.shape[1], k.shape[1], phi_q.shape[-1], v1.shape[-1]):
        scores = heads_matmul(phi_q, phi_k, "bqhf,bkhf->bhqk")
        if causal:
            scores = scores * causal_mask(q.shape[1])
        out = heads_matmul(scores, v1, "bhqk,bkhd->bqhd")
    else:
        kv = heads_matmul(phi_k, v1, "bnhf,bnhd->bhfd")
        out = heads_matmul(phi_q, kv, "bnhf,bhfd->bnhd")
    if cfg.inverse == "spu":
        return out[..., :-1] * refined_reciprocal(out[..., -1:])
    # l2 features: |phi(q).phi(k)| <= 1 per key; the exp-based variants are unbounded.
    hi = sums_bound(k.shape[1]) if cfg.variant == "l2" else 24
    # Unlike softmax's, RFA's normalisers can be negative (trig features): signed.
    return divide_pow2(out[..., :-1], out[..., -1:], DENOMINATOR_LO, hi, signed=True)


def attend(q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False):
    """Dispatch on `cfg.kind`."""
    if cfg.kind == "rfa":
        return random_feature_attention(q, k, v, key_mask, cfg, layer, causal=causal)
    return softmax_attention(q, k, v, key_mask, causal=causal, exp=cfg.exp)
