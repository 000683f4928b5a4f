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
    inverse_norm,
    positive_features,
    random_directions,
    trig_features,
)
from secfwt_jax.models.mpc_ops import exp_nonpositive, heads_matmul, refined_reciprocal


def causal_mask(seq_len: int) -> np.ndarray:
    """Public lower-triangular [seq, seq] 0/1 mask (query row, key column)."""
    return np.tril(np.ones((seq_len, seq_len), dtype=np.float32))


def softmax_attention(q, k, v, key_mask, *, causal: bool = False, exp: str = "exact"):
    """Softmax attention with multiplicative masking: [B, N, H, D] -> [B, N, H, D].

    The row max is taken over all keys; any per-row constant leaves softmax unchanged and
    this one keeps every exp argument <= 0, which SPU's exp and `exp_nonpositive` (``exp=
    "poly"``, see `config.ExpImpl`) need. The two per-(batch,
    head) products are packed into single matmuls (`mpc_ops.heads_matmul`), and the
    1/sqrt(d) scale (a truncation under MPC) goes on the smaller of q [N, D] and the
    scores [N, N].
    """
    seq, head_dim = q.shape[1], q.shape[-1]
    scale = 1.0 / np.sqrt(head_dim)
    if seq > head_dim:
        q = q * scale
    scores = heads_matmul(q, k, "bqhd,bkhd->bhqk")
    if seq <= head_dim:
        scores = scores * scale
    weights = _exp(exp)(scores - jnp.max(scores, axis=-1, keepdims=True))
    weights = weights * key_mask[:, None, None, :]
    if causal:
        weights = weights * causal_mask(q.shape[1])
    out = heads_matmul(weights, v, "bhqk,bkhd->bqhd")
    denom = jnp.sum(weights, axis=-1)  # [B, H, N]
    return out * jnp.reciprocal(jnp.transpose(denom, (0, 2, 1)))[..., None]


def _exp(impl: str):
    """exp for arguments <= 0: `jnp.exp` ("exact") or `mpc_ops.exp_nonpositive` ("poly")."""
    return exp_nonpositive if impl == "poly" else jnp.exp


def _trig(x, w, cfg: AttentionConfig, *, guaranteed_bound: bool, row_scale=None):
    """Trig features; the poly path clips only when |w^T x| has no guaranteed bound."""
    bound = None if guaranteed_bound else cfg.poly_bound
    return trig_features(
        x, w, trig=cfg.trig, bound=bound, degree=cfg.poly_degree, row_scale=row_scale
    )


def rfa_features(q, k, key_mask, cfg: AttentionConfig, layer: int):
    """Feature maps phi(q), phi(k) for one layer: [B, N, H, D] -> [B, N, H, F], padded
    keys' features zeroed (which removes them from RFA's numerator and denominator)."""
    phi_q, phi_k = _unmasked_features(q, k, cfg, layer)
    return phi_q, phi_k * key_mask[:, :, None, None]


def _unmasked_features(q, k, cfg: AttentionConfig, layer: int):
    """phi(q), phi(k) of every token, padding included.

    q and k are stacked on the batch axis and mapped together: under MPC every op costs
    its rounds once instead of twice (the l2 normalisation's rsqrt alone is ~26 rounds).
    """
    batch, _, num_heads, head_dim = q.shape
    w = random_directions(cfg.seed, layer, num_heads, head_dim, cfg.num_features, cfg.sigma)
    qk = jnp.concatenate([q, k], axis=0)
    if cfg.variant == "l2":
        # sin/cos of w^T (x / |x|), the 1/|x| applied after the projection (m products
        # per row, not D); |w^T x| / |x| <= |w| still bounds the argument.
        phi = _trig(qk, w, cfg, guaranteed_bound=True, row_scale=inverse_norm(qk))
        phi_q, phi_k = phi[:batch], phi[batch:]
    else:
        # exp(q.k / sqrt(d)) = exp(q'.k') with x' = x / d^(1/4).
        qks = qk * (1.0 / head_dim**0.25)
        if cfg.variant == "positive":
            phi = positive_features(qks, w, cfg.sigma)
            phi_q, phi_k = phi[:batch], phi[batch:]
        else:  # softmax_kernel
            phi = _trig(qks, w, cfg, guaranteed_bound=False)
            phi_q, phi_k = phi[:batch], phi[batch:]
            # Query magnitude factor cancels in the ratio. Key factor exp(|k'|^2 / 2 s^2) is
            # shifted by its max over keys (a common factor, also cancels) to stay bounded.
            ks = qks[batch:]
            sq = (0.5 / cfg.sigma**2) * jnp.sum(ks * ks, axis=-1, keepdims=True)
            phi_k = phi_k * _exp(cfg.exp)(sq - jnp.max(sq, axis=1, keepdims=True))
    return phi_q, phi_k


def random_feature_attention(
    q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False
):
    """RFA: phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1). [B, N, H, D] -> [B, N, H, D].

    v gets the key mask as an extra column, so numerator and denominator come out of the
    same two matmuls ([F, D+1] key summary, then [N, D+1]), and only the N denominators
    are inverted. Padded keys are removed from both by masking whichever is narrower:
    phi(k)'s F features, or v's D values (then the extra column is the mask itself, free).
    The sums are the same; under MPC each masked value is one secret product, so at F =
    2m > D (m = 64 at d = 64, MiniLM's m = 32 at d = 32) masking v saves F - D per token.
    """
    phi_q, phi_k = _unmasked_features(q, k, cfg, layer)
    mask = key_mask[:, :, None, None].astype(v.dtype)
    if phi_k.shape[-1] < v.shape[-1]:
        phi_k = phi_k * mask
        mask = jnp.ones_like(mask)
    else:
        v = v * mask
    v1 = jnp.concatenate([v, jnp.broadcast_to(mask, v.shape[:-1] + (1,))], axis=-1)
    if causal:
        kv = jnp.cumsum(jnp.einsum("bnhf,bnhd->bnhfd", phi_k, v1), axis=1)
        out = jnp.einsum("bnhf,bnhfd->bnhd", phi_q, kv)
    else:
        kv = heads_matmul(phi_k, v1, "bnhf,bnhd->bhfd")
        out = heads_matmul(phi_q, kv, "bnhf,bhfd->bnhd")
    return out[..., :-1] * refined_reciprocal(out[..., -1:])


def attend(q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False):
    """Dispatch on `cfg.kind`."""
    if cfg.kind == "rfa":
        return random_feature_attention(q, k, v, key_mask, cfg, layer, causal=causal)
    return softmax_attention(q, k, v, key_mask, causal=causal, exp=cfg.exp)
