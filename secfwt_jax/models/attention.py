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

import functools

import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.feature_maps import (
    exact_sin_cos,
    l2_normalize,
    poly_sin_cos,
    positive_features,
    random_directions,
    trig_features,
)


def causal_mask(seq_len: int) -> np.ndarray:
    """Public lower-triangular [seq, seq] 0/1 mask (query row, key column)."""
    return np.tril(np.ones((seq_len, seq_len), dtype=np.float32))


def softmax_attention(q, k, v, key_mask, *, causal: bool = False):
    """Exact softmax attention with multiplicative masking: [B, N, H, D] -> [B, N, H, D].

    The row max is taken over all keys; any per-row constant leaves softmax unchanged and
    this one keeps every exp argument <= 0, which SPU's exp needs.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / np.sqrt(q.shape[-1]))
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    weights = weights * key_mask[:, None, None, :]
    if causal:
        weights = weights * causal_mask(q.shape[1])
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    denom = jnp.sum(weights, axis=-1)  # [B, H, N]
    return out * jnp.reciprocal(jnp.transpose(denom, (0, 2, 1)))[..., None]


def _sin_cos_fn(cfg: AttentionConfig):
    if cfg.trig == "poly":
        return functools.partial(poly_sin_cos, bound=cfg.poly_bound, degree=cfg.poly_degree)
    return exact_sin_cos


def rfa_features(q, k, key_mask, cfg: AttentionConfig, layer: int):
    """Feature maps phi(q), phi(k) for one layer: [B, N, H, D] -> [B, N, H, F].

    Padded keys' features are zeroed, which removes them from both the numerator and the
    denominator of RFA.
    """
    num_heads, head_dim = q.shape[2], q.shape[3]
    w = random_directions(cfg.seed, layer, num_heads, head_dim, cfg.num_features, cfg.sigma)
    if cfg.variant == "l2":
        phi_q = trig_features(l2_normalize(q), w, _sin_cos_fn(cfg))
        phi_k = trig_features(l2_normalize(k), w, _sin_cos_fn(cfg))
    else:
        # exp(q.k / sqrt(d)) = exp(q'.k') with x' = x / d^(1/4).
        scale = 1.0 / head_dim**0.25
        qs, ks = q * scale, k * scale
        if cfg.variant == "positive":
            phi_q = positive_features(qs, w, cfg.sigma)
            phi_k = positive_features(ks, w, cfg.sigma)
        else:  # softmax_kernel
            phi_q = trig_features(qs, w, _sin_cos_fn(cfg))
            # Query magnitude factor cancels in the ratio. Key factor exp(|k'|^2 / 2 s^2) is
            # shifted by its max over keys (a common factor, also cancels) to stay bounded.
            sq = (0.5 / cfg.sigma**2) * jnp.sum(ks * ks, axis=-1, keepdims=True)
            phi_k = trig_features(ks, w, _sin_cos_fn(cfg)) * jnp.exp(
                sq - jnp.max(sq, axis=1, keepdims=True)
            )
    return phi_q, phi_k * key_mask[:, :, None, None]


def random_feature_attention(
    q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False
):
    """RFA: phi(q) (phi(k)^T v) / phi(q) (phi(k)^T 1). [B, N, H, D] -> [B, N, H, D]."""
    phi_q, phi_k = rfa_features(q, k, key_mask, cfg, layer)
    if causal:
        kv = jnp.cumsum(jnp.einsum("bnhf,bnhd->bnhfd", phi_k, v), axis=1)
        num = jnp.einsum("bnhf,bnhfd->bnhd", phi_q, kv)
        den = jnp.einsum("bnhf,bnhf->bnh", phi_q, jnp.cumsum(phi_k, axis=1))
    else:
        kv = jnp.einsum("bnhf,bnhd->bhfd", phi_k, v)
        num = jnp.einsum("bnhf,bhfd->bnhd", phi_q, kv)
        den = jnp.einsum("bnhf,bhf->bnh", phi_q, jnp.sum(phi_k, axis=1))
    return num * jnp.reciprocal(den)[..., None]


def attend(q, k, v, key_mask, cfg: AttentionConfig, layer: int, *, causal: bool = False):
    """Dispatch on `cfg.kind`."""
    if cfg.kind == "rfa":
        return random_feature_attention(q, k, v, key_mask, cfg, layer, causal=causal)
    return softmax_attention(q, k, v, key_mask, causal=causal)
