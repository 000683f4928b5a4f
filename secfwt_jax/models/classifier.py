"""`Classifier`: a trunk (BERT, RoBERTa or GPT-2) plus a head, as pure functions of params.

    logits = Classifier(config, head).logits(params, batch, prompt=None)   # [batch, C]

`params` is a dict `{trunk_name: trunk_params, head_name: head_params}` in Hugging Face
naming, so trees from `transformers`' Flax classes drop in. `batch` is a dict:
  input_ids       int [B, N] or one-hot float [B, N, V] (the MPC form)
  attention_mask  float [B, N], 1 for real tokens
  token_type_ids  optional int [B, N] (BERT)
  select          one-hot float [B, N]: the mask token (mlm head) or last token (lm head)
  labels          one-hot float [B, C] (only the loss reads it)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.encoder import Encoder
from secfwt_jax.models.heads import (
    TRUNK_NAMES,
    HeadConfig,
    extend_select,
    linear_scores,
    lm_scores,
    mlm_scores,
    select_position,
)
from secfwt_jax.models.mpc_ops import log_pow2, max_last_axis
from secfwt_jax.seeds import private_key


def trunk_module(config: ModelConfig):
    if config.family == "gpt2":
        from secfwt_jax.models.gpt2 import Decoder

        return Decoder(config)
    if config.family == "llama":
        from secfwt_jax.models.llama import LlamaDecoder

        return LlamaDecoder(config)
    return Encoder(config)


def head_name(config: ModelConfig, head: HeadConfig) -> str:
    if head.kind == "linear":
        return "classifier"
    if head.kind == "mlm":
        return {"bert": "cls", "roberta": "lm_head"}[config.family]
    # The next-token verbalizer owns no parameters of its own: it reads the output table
    # (GPT-2's tied wte; a Llama's embeddings or, untied, its `lm_head`, which stays with
    # the frozen model weights, never a "head" a trainable set would move).
    return "verbalizer"


@dataclasses.dataclass(frozen=True)
class Classifier:
    config: ModelConfig
    head: HeadConfig

    def __post_init__(self) -> None:
        decoder = self.config.causal
        if decoder and self.head.kind == "mlm":
            raise ValueError(f"head.kind: 'mlm' needs an encoder (bert/roberta), not {self.config.family}")  # fmt: skip
        if not decoder and self.head.kind == "lm":
            raise ValueError("head.kind: 'lm' is for decoders (gpt2, llama); use 'mlm' or 'linear' for encoders")  # fmt: skip

    @property
    def trunk_name(self) -> str:
        return TRUNK_NAMES[self.config.family]

    @property
    def head_name(self) -> str:
        return head_name(self.config, self.head)

    @property
    def prompt_position(self) -> int:
        """Where a soft prompt is inserted: after [CLS]/<s> for encoders, at 0 for decoders."""
        return 0 if self.config.causal else 1

    def init_head(self, seed: int) -> dict:
        """A fresh linear head (normal(0.02) kernel, zero bias); the other heads own none."""
        if self.head.kind != "linear":
            return {}
        rng = np.random.default_rng([seed, 7])
        kernel = rng.normal(0.0, 0.02, (self.config.hidden_size, self.head.num_labels))
        return {
            "kernel": kernel.astype(np.float32),
            "bias": np.zeros(self.head.num_labels, np.float32),
        }

    def init(self, seed: int, seq_len: int = 8) -> dict:
        """Randomly initialised parameters (trunk from Flax init, head from `init_head`)."""
        ids = jnp.zeros((1, seq_len), jnp.int32)
        mask = jnp.ones((1, seq_len), jnp.float32)
        key = private_key(seed, stream=13)  # 128 bits: the seed is the model owner's secret
        trunk = trunk_module(self.config).init(key, ids, mask)["params"]
        params = {self.trunk_name: jax.tree_util.tree_map(np.asarray, trunk)}
        if self.head.kind == "linear":
            params[self.head_name] = self.init_head(seed)
        if self.config.family == "llama" and not self.config.tie_embeddings:
            rng = np.random.default_rng([seed, 17])
            kernel = rng.normal(0.0, 0.02, (self.config.hidden_size, self.config.vocab_size))
            params["lm_head"] = {"kernel": kernel.astype(np.float32)}
        return params

    @property
    def scores_one_position(self) -> bool:
        """A Llama scored by its next-token verbalizer runs its last layer at the scored
        position only (`llama.LlamaDecoder`'s `select`): the same logits, and the top
        layer's query, attention output and MLP cost one token instead of N."""
        return self.config.family == "llama" and self.head.kind == "lm"

    def _scored_select(self, batch, prompt_len: int = 0):
        """The one-hot scored position the trunk's last layer reads, or None."""
        if not self.scores_one_position:
            return None
        select = batch["select"]
        return extend_select(select, prompt_len, self.prompt_position) if prompt_len else select

    def hidden(self, params, batch, prompt=None, select=None):
        """Trunk hidden states [B, N(+P), H] and the (extended) mask [B, N(+P)]; with a
        Llama's `select`, the last layer's row at that position only [B, 1, H]."""
        return trunk_module(self.config).apply(
            {"params": params[self.trunk_name]},
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            prompt,
            **self._select_kwarg(select),
        )

    def lower_hidden(self, params, batch, num_layers: int):
        """Embeddings plus the first `num_layers` trunk layers: the frozen-trunk cache."""
        return trunk_module(self.config).apply(
            {"params": params[self.trunk_name]},
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            num_layers=num_layers,
        )

    def insert_prompt(self, hidden, mask, prompt):
        """A soft prompt [1|B, P, H] put into hidden states [B, N, H] at `prompt_position`
        (before the tokens of a decoder, after [CLS]/<s> of an encoder); the mask [B, N]
        gains P ones."""
        from secfwt_jax.models.encoder import insert_prompt
        from secfwt_jax.models.gpt2 import prepend_prompt

        return (prepend_prompt if self.config.causal else insert_prompt)(hidden, mask, prompt)

    def upper_logits(self, params, hidden, mask, batch, first_layer: int, prompt=None):
        """Layers `first_layer..` on cached hidden states [B, N, H], then the head. A `prompt`
        [1|B, P, H] enters there (a deep prompt at the first uncached layer)."""
        num_layers = self.config.num_layers
        prompt_len = 0
        if prompt is not None:
            if first_layer >= num_layers:
                raise ValueError("prompt: a deep prompt needs at least one uncached layer above it")  # fmt: skip
            hidden, mask = self.insert_prompt(hidden, mask, prompt)
            prompt_len = prompt.shape[1]
        # A head-only set caches every layer: no trunk parameters are left to read.
        select = self._scored_select(batch, prompt_len) if first_layer < num_layers else None
        hidden, mask = trunk_module(self.config).apply(
            {"params": params.get(self.trunk_name, {})}, hidden, mask, embed=False,
            first_layer=first_layer, **self._select_kwarg(select),
        )  # fmt: skip
        return self._head_scores(params, hidden, mask, batch, prompt_len, select)

    @staticmethod
    def _select_kwarg(select) -> dict:
        return {} if select is None else {"select": select}

    def _head_scores(self, params, hidden, mask, batch, prompt_len: int, select):
        """The head on the trunk's output: with a scored-position last layer (`select`), its
        single row [B, 1, H]; else every position's."""
        if select is not None:
            return lm_scores(self.output_table(params), hidden[:, 0], self.head.verbalizer_ids)
        return self.scores(params, hidden, mask, batch, prompt_len)

    def scores(self, params, hidden, mask, batch, prompt_len: int = 0):
        """Head on top of trunk hidden states: -> logits [B, C]."""
        if self.head.kind == "linear":
            return linear_scores(params[self.head_name], hidden, mask, self.head.pooling)
        select = batch["select"]
        if prompt_len:
            select = extend_select(select, prompt_len, self.prompt_position)
        h = select_position(hidden, select)
        if self.head.kind == "mlm":
            return mlm_scores(
                params[self.head_name], self.word_table(params), h, self.config,
                self.head.verbalizer_ids,
            )  # fmt: skip
        return lm_scores(self.output_table(params), h, self.head.verbalizer_ids)

    def word_table(self, params):
        """The input embeddings [vocab, hidden]."""
        trunk = params[self.trunk_name]
        if self.config.family == "gpt2":
            return trunk["wte"]["embedding"]
        if self.config.family == "llama":
            return trunk["embed_tokens"]["embedding"]
        return trunk["embeddings"]["word_embeddings"]["embedding"]

    def output_table(self, params):
        """The next-token scores' table [vocab, hidden]: tied to the input embeddings, or an
        untied Llama's `lm_head/kernel` transposed."""
        if self.config.family == "llama":
            from secfwt_jax.models.llama import output_table

            return output_table(params, self.config)
        return self.word_table(params)

    def next_token_logits(self, params, batch):
        """Logits over the whole vocabulary at every position [B, N, V] (generation and
        perplexity; tuning scores only the verbalizer words)."""
        hidden, _ = self.hidden(params, batch)
        return hidden @ self.output_table(params).T

    def logits(self, params, batch, prompt=None):
        """[B, C] class scores for `batch` (optionally with a soft prompt [1|B, P, H])."""
        ids = batch["input_ids"]
        if 0 in ids.shape[:2]:
            raise ValueError(f"input_ids: empty input, shape {list(ids.shape)} (need at least one example of one token)")  # fmt: skip
        prompt_len = 0 if prompt is None else prompt.shape[1]
        select = self._scored_select(batch, prompt_len)
        hidden, mask = self.hidden(params, batch, prompt, select)
        return self._head_scores(params, hidden, mask, batch, prompt_len, select)


def cross_entropy(logits, labels_onehot):
    """Mean softmax cross-entropy over the batch (`cross_entropy_per_example`'s mean)."""
    return jnp.mean(cross_entropy_per_example(logits, labels_onehot))


def cross_entropy_per_example(logits, labels_onehot):
    """Softmax cross-entropy of each row [B]; labels are one-hot [B, C] so no secret
    gather is needed.

    log_softmax(z) = z - max(z) - log(sum exp(z - max(z))), with the MPC-cheap max
    (`mpc_ops.max_last_axis`) and log (`mpc_ops.log_pow2` on the sum, which lies in
    [1, C]). The exp stays SPU's: the project's cheaper exps have smaller errors, but
    theirs are truncation noise, which does not cancel between SPSA's L+ and L-, and the
    MPC-vs-plaintext parameter gap of a GPT-2 test doubled with them (docs/cost.md, 8).
    """
    num_classes = logits.shape[-1]
    shifted = logits - max_last_axis(logits)
    # sum_c y_c (shifted_c - log_total) = sum_c y_c shifted_c - log_total (one-hot y): the
    # label product needs only `shifted`, so it rides in the log's last product op.
    total = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    # total in [1, C] (up to the exp's error at the max): for C = 2 one octave, no
    # comparison; a sum a hair under 1 extrapolates (or saturates at log 1 = 0).
    log_total, picked = log_pow2(
        total, 0, max(1, int(np.ceil(np.log2(num_classes)))), also=(labels_onehot, shifted)
    )
    return log_total[..., 0] - jnp.sum(picked, axis=-1)


def cross_entropy_loss(logits_fn):
    """The tuning loss, defined once: (trainable, frozen, batch) -> mean cross-entropy of
    `logits_fn(trainable, frozen, batch)` against `batch["labels"]`. Every step (SPSA,
    CMA-ES, backprop, plaintext or under SPU) and the cost cases use it."""
    return lambda t, f, b: cross_entropy(logits_fn(t, f, b), b["labels"])


def per_example_loss(logits_fn):
    """(trainable, frozen, batch) -> each row's cross-entropy [B]: what a differentially
    private step clips before it sums (`tuning.privacy`)."""
    return lambda t, f, b: cross_entropy_per_example(logits_fn(t, f, b), b["labels"])


def accuracy(logits, labels_onehot):
    return jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels_onehot, -1))
