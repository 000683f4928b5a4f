"""BERT and RoBERTa encoders as Flax modules with pluggable attention.

Submodule names mirror `transformers`' Flax classes (`FlaxBertModule`,
`FlaxRobertaModule`), so their parameter trees load unchanged:
`embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}`,
`encoder/layer/<i>/{attention/{self,output},intermediate,output}`. Extra subtrees such as
`pooler` are ignored.

Inputs are MPC-friendly:
  * `input_ids` may be integer ids [batch, seq] (plaintext) or a one-hot float
    [batch, seq, vocab]; under MPC the data owner secret-shares the one-hot form, because
    a gather at secret indices is far more expensive than a matmul.
  * `attention_mask` is a float [batch, seq] of 1/0 and is applied multiplicatively.
  * Position ids are public: arange for BERT, arange + pad_id + 1 for RoBERTa. For right
    padding this equals Hugging Face's ids at every real token; padded tokens' outputs are
    never read (masked as keys, excluded from pooling).
  * `prompt` [batch or 1, P, hidden] optionally inserts soft prompt vectors after the first
    token (BBT / SecFwT prompt tuning); the mask is extended with ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.attention import attend
from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.mpc_ops import gelu_piecewise, gelu_quad, layer_norm


def activation_fn(name: str, gelu_impl: str = "piecewise"):
    """Hugging Face activation name -> function ("gelu" is the erf form, "gelu_new" and
    "gelu_pytorch_tanh" the tanh form). `gelu_impl` "exact" uses jax.nn.gelu,
    "piecewise" the MPC-cheap `mpc_ops.gelu_piecewise` fitted to the same form."""
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        approximate = name != "gelu"
        if gelu_impl == "exact":
            return lambda x: jax.nn.gelu(x, approximate=approximate)
        if gelu_impl == "relu":
            return jax.nn.relu
        if gelu_impl == "quad":
            return gelu_quad
        return lambda x: gelu_piecewise(x, approximate=approximate)
    return {"relu": jax.nn.relu, "tanh": jnp.tanh}[name]


class LayerNorm(nn.Module):
    """LayerNorm with Hugging Face's parameter names (`scale`, `bias`).

    Written out instead of `flax.linen.LayerNorm` for two reasons: `mpc_ops.layer_norm` is
    accurate under MPC fixed point (flax's fast E[x^2] - E[x]^2 loses small variances to
    cancellation and truncation bias), and flax 0.8.4's LayerNorm computes wrong values when its
    parameters are vmapped under `jax.jit` (population element 1 of an SPSA step was off
    by up to 0.09 here), which the batched SPSA step does.
    """

    epsilon: float = 1e-12

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        return layer_norm(x, scale, bias, self.epsilon)


class TokenEmbedding(nn.Module):
    """Embedding table `embedding` [vocab, hidden]; looks up ids or multiplies a one-hot."""

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, ids_or_onehot):
        table = self.param(
            "embedding", nn.initializers.normal(0.02), (self.vocab_size, self.features)
        )
        if not jnp.issubdtype(ids_or_onehot.dtype, jnp.integer):
            return ids_or_onehot @ table
        if self.vocab_size <= 2:
            return small_table_lookup(table, ids_or_onehot)
        return jnp.take(table, ids_or_onehot, axis=0)


def small_table_lookup(table, ids):
    """table[ids] for a table of 1 or 2 rows (token types), without a gather.

    SPU 0.9.3 gathers at secret indices in a loop, about 45 rounds per index: the data
    owner's token types of 24 x 16 tokens took 17,408 of a MiniLM trunk chunk's 18,965
    rounds (measured). One row: every valid id is 0. Two rows: t0 + id (t1 - t0), one
    product per element; exact for id 0, within an ulp of t1 for id 1."""
    shape = ids.shape + table.shape[-1:]
    if table.shape[0] == 1:
        return jnp.broadcast_to(table[0], shape)
    return table[0] + ids[..., None].astype(table.dtype) * (table[1] - table[0])


def insert_prompt(embeds, mask, prompt):
    """Insert prompt [1 or B, P, H] after the first token; extend the mask with ones."""
    batch = embeds.shape[0]
    prompt = jnp.broadcast_to(prompt, (batch,) + prompt.shape[1:]).astype(embeds.dtype)
    embeds = jnp.concatenate([embeds[:, :1], prompt, embeds[:, 1:]], axis=1)
    ones = jnp.ones((batch, prompt.shape[1]), mask.dtype)
    return embeds, jnp.concatenate([mask[:, :1], ones, mask[:, 1:]], axis=1)


class Embeddings(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, prompt=None):
        cfg = self.config
        words = TokenEmbedding(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
        if prompt is not None:
            words, attention_mask = insert_prompt(words, attention_mask, prompt)
        seq = words.shape[1]
        offset = cfg.pad_token_id + 1 if cfg.family == "roberta" else 0
        positions = np.arange(seq) + offset
        pos_table = TokenEmbedding(cfg.max_positions, cfg.hidden_size, name="position_embeddings")
        hidden = words + pos_table(jnp.asarray(positions))[None]
        types = TokenEmbedding(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")
        if token_type_ids is None:
            hidden = hidden + types(jnp.zeros((1, 1), jnp.int32))
        else:
            if prompt is not None:
                token_type_ids = jnp.pad(token_type_ids, ((0, 0), (prompt.shape[1], 0)))
            hidden = hidden + types(token_type_ids)
        hidden = LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")(hidden)
        return hidden, attention_mask


class DenseParams(nn.Module):
    """The parameters of an `nn.Dense` (same names, shapes and initialisers), returned
    instead of applied, so that several projections of one input can run as one matmul."""

    features: int

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))  # fmt: skip
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


class SelfAttention(nn.Module):
    """Hugging Face's query, key and value projections (the same parameter tree), applied
    as ONE matmul with the three kernels side by side: the hidden states are the shared
    operand, so under SEMI2K they are opened once instead of three times (2 x 98,304
    elements fewer per BERT-base layer at 128 tokens), and under every protocol it is one
    matmul's rounds instead of three."""

    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask):
        cfg = self.config
        shape = hidden.shape[:2] + (cfg.num_heads, cfg.head_dim)
        projections = [DenseParams(cfg.hidden_size, name=n)(hidden.shape[-1]) for n in ("query", "key", "value")]  # fmt: skip
        kernel = jnp.concatenate([kernel for kernel, _ in projections], axis=1)
        bias = jnp.concatenate([bias for _, bias in projections])
        q, k, v = jnp.split(hidden @ kernel + bias, 3, axis=-1)
        out = attend(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask, cfg.attention, self.layer_index, causal=False)  # fmt: skip
        return out.reshape(hidden.shape)


class DenseAddNorm(nn.Module):
    """dense -> residual add -> LayerNorm (Hugging Face's `*Output` blocks)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, residual):
        x = nn.Dense(self.config.hidden_size, name="dense")(x)
        return LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm")(x + residual)


class Attention(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask):
        attn = SelfAttention(self.config, self.layer_index, name="self")(hidden, mask)
        return DenseAddNorm(self.config, name="output")(attn, hidden)


class Intermediate(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden):
        x = nn.Dense(self.config.intermediate_size, name="dense")(hidden)
        return activation_fn(self.config.activation, self.config.gelu_impl)(x)


class EncoderLayer(nn.Module):
    config: ModelConfig
    layer_index: int

    @nn.compact
    def __call__(self, hidden, mask):
        hidden = Attention(self.config, self.layer_index, name="attention")(hidden, mask)
        x = Intermediate(self.config, name="intermediate")(hidden)
        return DenseAddNorm(self.config, name="output")(x, hidden)


class LayerStack(nn.Module):
    """Layers `first .. first + count - 1` of type `block`, named by absolute index like
    Hugging Face (`.../0`, `.../1`, ...); shared by the encoders and the GPT-2 decoder."""

    config: ModelConfig
    first: int = 0
    count: int | None = None
    block: type = EncoderLayer

    @nn.compact
    def __call__(self, hidden, mask, last_select=None):
        """`last_select` [B, N] is handed to the last block only (a block that can score
        one position, `llama.LlamaBlock`)."""
        last = self.config.num_layers if self.count is None else self.first + self.count
        for i in range(self.first, last):
            block = self.block(self.config, i, name=str(i))
            if last_select is not None and i == last - 1:
                hidden = block(hidden, mask, last_select)
            else:
                hidden = block(hidden, mask)
        return hidden


class LayerCollection(nn.Module):
    config: ModelConfig
    first: int = 0
    count: int | None = None

    @nn.compact
    def __call__(self, hidden, mask):
        return LayerStack(self.config, self.first, self.count, name="layer")(hidden, mask)


class Encoder(nn.Module):
    """BERT / RoBERTa trunk: ids -> hidden states [batch, seq, hidden] and the mask used.

    `first_layer` / `num_layers` run a slice of the stack (frozen-trunk caching feeds
    cached activations into the upper slice with `embed=False`).
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
        if embed:
            hidden, mask = Embeddings(self.config, name="embeddings")(
                input_ids, attention_mask, token_type_ids, prompt
            )
        else:
            hidden, mask = input_ids, attention_mask
        hidden = LayerCollection(self.config, first_layer, num_layers, name="encoder")(hidden, mask)
        return hidden, mask
