"""Classification heads and the whole classifier `ClassificationModel`.

Head kinds:
  * "linear": pool the trunk ("cls" token or masked "mean"), then a new linear layer
    `classifier/{kernel,bias}` -> [batch, num_labels].
  * "mlm": prompt-based masked-LM classification (LM-BFF, MeZO). The template puts a mask
    token in the text; `select` [batch, seq] is the one-hot of its position. The checkpoint's
    MLM head scores only the verbalizer words -> [batch, num_labels].
  * "lm": GPT-2 next-token verbalizer scores at the position given by `select` (the last
    real token) -> [batch, num_labels].

Selecting a position by a one-hot `select` (a weighted sum over the sequence) keeps the
position data-dependent but secret under MPC; no secret-indexed gather is needed.

Parameter trees use the Hugging Face names: `bert` / `roberta` / `transformer` for the
trunk, `cls/predictions` (BERT) or `lm_head` (RoBERTa) for the MLM head, and GPT-2's tied
`wte` for its LM head.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.encoder import activation_fn
from secfwt_jax.models.mpc_ops import layer_norm, reciprocal_pow2, sums_bound

HeadKind = Literal["linear", "mlm", "lm"]
TRUNK_NAMES = {"bert": "bert", "roberta": "roberta", "gpt2": "transformer", "llama": "model"}


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Which head sits on the trunk.

    Attributes:
      kind: "linear", "mlm" or "lm" (see module doc).
      num_labels: number of classes C.
      pooling: "cls" or "mean" (linear head only).
      verbalizer_ids: one vocabulary id per class (mlm and lm heads).
    """

    kind: HeadKind = "linear"
    num_labels: int = 2
    pooling: Literal["cls", "mean"] = "cls"
    verbalizer_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlm", "lm"):
            raise ValueError(f"head.kind: unknown {self.kind!r}")
        if self.num_labels < 2:
            raise ValueError("head.num_labels: need at least 2 classes")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"head.pooling: unknown {self.pooling!r}")
        if self.kind != "linear" and len(self.verbalizer_ids) != self.num_labels:
            raise ValueError(
                f"head.verbalizer_ids: need one token id per class ({self.num_labels}), "
                f"got {len(self.verbalizer_ids)}"
            )


def weighted_sum(hidden, weights):
    """sum_n weights[b, n] hidden[b, n, :]: [B, N, H], [B, N] -> [B, H].

    A multiply and a reduce rather than an einsum: SPU 0.9.3 runs a batched dot_general as
    a loop with 2 rounds per batch row, the elementwise form costs 2 rounds in all.
    """
    return jnp.sum(hidden * weights[..., None], axis=1)


def pool(hidden, mask, how: str):
    """[B, N, H] -> [B, H]: first token, or the mean over real tokens."""
    if how == "cls":
        return hidden[:, 0]
    total = weighted_sum(hidden, mask)
    count = jnp.sum(mask, axis=1, keepdims=True)  # 1 .. N tokens
    return total * reciprocal_pow2(count, 0, sums_bound(mask.shape[1]))


def select_position(hidden, select):
    """Hidden state at the one-hot position `select` [B, N]: [B, N, H] -> [B, H]."""
    return weighted_sum(hidden, select)


def extend_select(select, prompt_len: int, at: int):
    """Shift a one-hot position [B, N] past a soft prompt of P slots inserted at `at`."""
    zeros = jnp.zeros((select.shape[0], prompt_len), select.dtype)
    return jnp.concatenate([select[:, :at], zeros, select[:, at:]], axis=1)


def dense(x, params):
    return x @ params["kernel"] + params["bias"]


def linear_scores(head_params, hidden, mask, pooling: str):
    """Linear head on pooled features: [B, N, H] -> [B, C]."""
    return dense(pool(hidden, mask, pooling), head_params)


def mlm_scores(head_params, word_table, h, cfg: ModelConfig, verbalizer_ids):
    """Verbalizer-word scores of the checkpoint's MLM head: h [B, H] -> [B, C].

    BERT: `cls/predictions/{transform/{dense,LayerNorm},bias}`;
    RoBERTa: `lm_head/{dense,layer_norm,bias}`. The decoder is tied to the word table.
    """
    if cfg.family == "bert":
        preds = head_params["predictions"]
        block, norm, bias = preds["transform"], preds["transform"]["LayerNorm"], preds["bias"]
    else:
        block, norm, bias = head_params, head_params["layer_norm"], head_params["bias"]
    act = activation_fn(cfg.activation if cfg.family == "bert" else "gelu", cfg.gelu_impl)
    h = layer_norm(act(dense(h, block["dense"])), norm["scale"], norm["bias"], cfg.layer_norm_eps)
    ids = np.asarray(verbalizer_ids)
    return h @ word_table[ids].T + bias[ids]


def lm_scores(word_table, h, verbalizer_ids):
    """Next-token scores of the verbalizer words (GPT-2's tied `wte`, a Llama's output
    table): [B, H] -> [B, C]."""
    return h @ word_table[np.asarray(verbalizer_ids)].T
