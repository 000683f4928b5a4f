"""GPT-2 decoder as a Flax module with pluggable causal attention.

Submodule names mirror `transformers`' `FlaxGPT2Module`, so its parameter tree loads
unchanged: `wte`, `wpe`, `h/<i>/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}`,
`ln_f`. Like HF's `FlaxConv1D`, every projection kernel is stored [out, in].

Inputs follow `encoder.py`: integer ids [batch, seq] or a one-hot float [batch, seq, vocab]
(the MPC form), a float 1/0 `attention_mask` applied multiplicatively, and public position
ids `arange(seq)`. With RIGHT padding these equal Hugging Face's ids at every token, and
under the causal mask a real token never sees a pad, so real tokens match HF exactly. A soft
`prompt` [1 or batch, P, hidden] is prepended at position 0 (it takes positions 0..P-1) and
the mask is extended with ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.attention import attend
from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.encoder import LayerNorm, LayerStack, TokenEmbedding, activation_fn


class Conv1D(nn.Module):
    """GPT-2's projection: `kernel` [out, in], `bias` [out]; x [..., in] -> [..., out]."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ kernel.T + bias


def prepend_prompt(embeds, mask, prompt):
    """Put prompt [1 or B, P, H] before the tokens; extend the mask [B, N] with ones."""
    batch = embeds.shape[0]
    prompt = jnp.broadcast_to(prompt, (batch,) + prompt.shape[1:]).astype(embeds.dtype)
    ones = jnp.ones((batch, prompt.shape[1]), mask.dtype)
    return jnp.concatenate([prompt, embeds], axis=1), jnp.concatenate([ones, mask], axis=1)


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        shape = hidden.shape[:2] + (cfg.num_heads, cfg.head_dim)
        qkv = Conv1D(3 * cfg.hidden_size, name="c_attn")(hidden)
        q, k, v = (x.reshape(shape) for x in jnp.split(qkv, 3, axis=-1))
        out = attend(q, k, v, mask, cfg.attention, self.layer_index, causal=True)
        return Conv1D(cfg.hidden_size, name="c_proj")(out.reshape(hidden.shape))


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden):
        x = Conv1D(self.config.intermediate_size, name="c_fc")(hidden)
        x = activation_fn(self.config.activation, self.config.gelu_impl)(x)
        return Conv1D(self.config.hidden_size, name="c_proj")(x)


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask):
        eps = self.config.layer_norm_eps
        attn = CausalSelfAttention(self.config, self.layer_index, name="attn")
        hidden = hidden + attn(LayerNorm(epsilon=eps, name="ln_1")(hidden), mask)
        mlp = MLP(self.config, name="mlp")
        return hidden + mlp(LayerNorm(epsilon=eps, name="ln_2")(hidden))


class Decoder(nn.Module):
    """GPT-2 trunk: ids -> hidden states [batch, seq(+P), hidden] and the mask used.

    Same call signature as `Encoder`. `token_type_ids` is accepted for that reason and
    ignored (GPT-2 has no token types). `first_layer` / `num_layers` run a slice of the
    stack; the final `ln_f` is applied only when the slice ends at the last layer, so a
    lower slice returns raw residual-stream activations that an upper slice (`embed=False`)
    continues from.
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
    ):
        del token_type_ids
        cfg = self.config
        if embed:
            hidden = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, name="wte")(input_ids)
            mask = attention_mask
            if prompt is not None:
                hidden, mask = prepend_prompt(hidden, mask, prompt)
            positions = jnp.asarray(np.arange(hidden.shape[1]))
            hidden = (
                hidden
                + TokenEmbedding(cfg.max_positions, cfg.hidden_size, name="wpe")(positions)[None]
            )
        else:
            hidden, mask = input_ids, attention_mask
        hidden = LayerStack(cfg, first_layer, num_layers, Block, name="h")(hidden, mask)
        if num_layers is None or first_layer + num_layers >= cfg.num_layers:
            hidden = LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_f")(hidden)
        return hidden, mask
