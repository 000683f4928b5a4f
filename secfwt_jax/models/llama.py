"""Llama-family decoder (Llama, SmolLM, Mistral-style) as a Flax module with pluggable
causal attention: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Submodule names mirror `transformers`' `FlaxLlamaModule`, so its parameter tree loads
unchanged: `embed_tokens/embedding`, `layers/<i>/{input_layernorm/weight,
self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel, post_attention_layernorm/weight,
mlp/{gate_proj,up_proj,down_proj}/kernel}`, `norm/weight`. Kernels are flax's [in, out].
The LM head (`lm_head/kernel` [hidden, vocab], beside the trunk) exists only when the
embeddings are untied; tied models score with the embedding table.

Two deliberate differences from `FlaxLlamaForCausalLM` (transformers 4.57): it builds its
rotary table with base 10000 whatever `rope_theta` says, and it never ties `lm_head`.
This module honours both (SmolLM2 uses rope_theta 1e5 and tied embeddings); parity tests
compare at rope_theta 1e4 and give the reference the tied kernel.

Inputs follow `gpt2.py`: ids [batch, seq] or a one-hot [batch, seq, vocab] (the MPC form),
a float 1/0 mask applied multiplicatively, public positions `arange(seq)` (right padding:
real tokens match Hugging Face exactly, and under the causal mask they never see a pad),
and a soft `prompt` [1 or batch, P, hidden] prepended at position 0.

Under MPC: the rotary tables are public, so rotating q and k is a public product; RFA
(`attention.kind: rfa`) takes its features of the ROTATED q and k, so relative positions
still shape the kernel. Grouped key/value heads are repeated to the query heads before
attention (copies, local under MPC). RMSNorm uses the bucketed rsqrt with sqrt(n) folded
into its constants (`mpc_ops.rms_norm`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.attention import attend
from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.encoder import LayerStack, TokenEmbedding
from secfwt_jax.models.gpt2 import prepend_prompt
from secfwt_jax.models.heads import select_position
from secfwt_jax.models.mpc_ops import rsqrt_pow2, silu_piecewise, sum_of_squares

#: Under FM64 with 18 fraction bits a secret product must stay below 2^(63 - 36) = 2^27 in
#: value, and LLMs carry massive activations: SmolLM2's residual stream reaches |x| = 16,400
#: from its 6th layer (x^2 = 2.7e8 > 2^27), which wrapped the plain sum of squares around the
#: ring and turned the MPC loss into 1.6e7. `rms_norm` squares x / 2^SHIFT as well.
SQUARE_SHIFT = 7


def rms_norm(x: jnp.ndarray, weight, eps: float) -> jnp.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, safe for massive activations.

    As `mpc_ops.layer_norm`: the mean square is never formed (rsqrt(sum + n eps) with
    sqrt(n) in the public output constants), and weight's product rides in the rsqrt's op.
    Under MPC no product may reach 2^27 (`SQUARE_SHIFT`), so both sum(x^2) and, with
    s = x / 2^SHIFT, sum(s^2) are formed; a token whose sum(s^2) exceeds 2^12 (some x^2 may
    then have wrapped) is normalised as s / sqrt(sum(s^2)), which is the same value, and
    every other token as before at full precision. One comparison per token and two selects
    (exact in the ring: a wrapped sum never leaks in); eps is dropped for the large tokens,
    where n eps / sum(x^2) < 1e-9.
    """
    n = x.shape[-1]
    shrunk = x * 2.0**-SQUARE_SHIFT
    plain, scaled = sum_of_squares(x), sum_of_squares(shrunk)
    large = scaled > 2.0**12
    total = jnp.where(large, scaled, plain + n * eps)
    source = jnp.where(large, shrunk, x)
    inv, normed = rsqrt_pow2(total, scale=float(np.sqrt(n)), also=(source, weight))
    return normed * inv


class RMSNorm(nn.Module):
    """Llama's RMSNorm with Hugging Face's parameter name (`weight`)."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x, weight, self.epsilon)


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Public (sin, cos) [seq, 1, head_dim] for positions 0..seq-1, in the half-split layout
    of Hugging Face's `rotate_half` (frequencies repeated for both halves)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rotary(x, sin, cos):
    """Rotate [B, N, H, D] by the public tables: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def silu_fn(impl: str):
    """`ModelConfig.silu_impl` -> the function (see `config.SiluImpl`)."""
    if impl == "exact":
        return jax.nn.silu
    if impl == "relu":
        return jax.nn.relu
    return lambda x: silu_piecewise(x, impl)


class LlamaAttention(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask, select=None):
        """[B, N, H] -> [B, N, H]; with a one-hot `select` [B, N], only the selected
        position's query is formed and attended: -> [B, 1, H] (`Classifier.scores_one_position`)."""
        cfg = self.config
        d, heads, kv = cfg.head_dim, cfg.num_heads, cfg.kv_heads
        dense = lambda n, name: nn.Dense(n, use_bias=cfg.attention_bias, name=name)  # noqa: E731
        batch, seq = hidden.shape[:2]
        sin, cos = rotary_tables(seq, d, cfg.rope_theta)
        causal = select is None
        if select is not None:
            # The query's rotation at its (secret) position: one-hot times public tables,
            # local under MPC. Keys up to that position are those the causal mask allows.
            hidden_q = select_position(hidden, select)[:, None, :]
            sin_q = (select @ sin[:, 0, :])[:, None, None, :]
            cos_q = (select @ cos[:, 0, :])[:, None, None, :]
            mask = mask * jnp.cumsum(select[:, ::-1], axis=1)[:, ::-1]
        else:
            hidden_q, sin_q, cos_q = hidden, sin, cos
        q = dense(heads * d, "q_proj")(hidden_q).reshape(batch, hidden_q.shape[1], heads, d)
        k = dense(kv * d, "k_proj")(hidden).reshape(batch, seq, kv, d)
        v = dense(kv * d, "v_proj")(hidden).reshape(batch, seq, kv, d)
        q, k = apply_rotary(q, sin_q, cos_q), apply_rotary(k, sin, cos)
        if kv != heads:  # grouped-query attention: each kv head serves heads // kv queries
            k, v = jnp.repeat(k, heads // kv, axis=2), jnp.repeat(v, heads // kv, axis=2)
        out = attend(q, k, v, mask, cfg.attention, self.layer_index, causal=causal)
        return dense(cfg.hidden_size, "o_proj")(out.reshape(batch, q.shape[1], heads * d))


class SwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden):
        cfg = self.config
        gate = nn.Dense(cfg.intermediate_size, use_bias=False, name="gate_proj")(hidden)
        up = nn.Dense(cfg.intermediate_size, use_bias=False, name="up_proj")(hidden)
        return nn.Dense(cfg.hidden_size, use_bias=False, name="down_proj")(silu_fn(cfg.silu_impl)(gate) * up)  # fmt: skip


class LlamaBlock(nn.Module):
    """x + attn(rms(x)), then + swiglu(rms(.))."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask, select=None):
        """With `select` [B, N] the block's output at that position only: [B, 1, H]."""
        eps = self.config.layer_norm_eps
        attn = LlamaAttention(self.config, self.layer_index, name="self_attn")
        update = attn(RMSNorm(eps, name="input_layernorm")(hidden), mask, select)
        if select is not None:
            hidden = select_position(hidden, select)[:, None, :]
        hidden = hidden + update
        mlp = SwiGLU(self.config, name="mlp")
        return hidden + mlp(RMSNorm(eps, name="post_attention_layernorm")(hidden))


class LlamaDecoder(nn.Module):
    """Llama trunk: ids -> hidden states [batch, seq(+P), hidden] and the mask used.

    Same call signature as `Encoder` and `gpt2.Decoder` (`token_type_ids` is ignored); a
    slice `first_layer` / `num_layers` returns the raw residual stream unless it ends at
    the last layer, where the final `norm` is applied.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        token_type_ids=None,
        prompt=None,
        *,
        embed: bool = True,
        first_layer: int = 0,
        num_layers: int | None = None,
        select=None,
    ):
        """`select` [B, N(+P)], one-hot, when the slice ends at the last layer: that layer
        forms its query, attention output and MLP at the selected position only, and the
        output is [B, 1, H] (the same values as the full stack's row there)."""
        del token_type_ids
        cfg = self.config
        if embed:
            hidden = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, name="embed_tokens")(input_ids)
            mask = attention_mask
            if prompt is not None:
                hidden, mask = prepend_prompt(hidden, mask, prompt)
        else:
            hidden, mask = input_ids, attention_mask
        ends_at_top = num_layers is None or first_layer + num_layers >= cfg.num_layers
        if select is not None and not ends_at_top:
            raise ValueError("select: only a slice that ends at the last layer scores one position")  # fmt: skip
        stack = LayerStack(cfg, first_layer, num_layers, LlamaBlock, name="layers")
        hidden = stack(hidden, mask, last_select=select)
        if ends_at_top:
            hidden = RMSNorm(cfg.layer_norm_eps, name="norm")(hidden)
        return hidden, mask


def output_table(params: dict, config: ModelConfig) -> jnp.ndarray:
    """The LM head as a [vocab, hidden] table: the embeddings (tied) or `lm_head/kernel`^T."""
    if config.tie_embeddings:
        return params["model"]["embed_tokens"]["embedding"]
    return params["lm_head"]["kernel"].T


__all__ = ["LlamaDecoder", "RMSNorm", "apply_rotary", "output_table", "rms_norm", "rotary_tables", "silu_fn"]  # fmt: skip
