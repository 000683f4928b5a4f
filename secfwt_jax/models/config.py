"""Typed model and attention configuration.

`ModelConfig` is read from a Hugging Face `config.json` (via `transformers.AutoConfig`), so
any local BERT, RoBERTa or GPT-2 checkpoint directory maps onto it. `AttentionConfig` picks
softmax or random feature attention (RFA) and its options. Both validate at construction and
raise a one-line `ValueError` naming the bad field.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["bert", "roberta", "gpt2", "llama"]
AttentionKind = Literal["softmax", "rfa"]
# How RFA turns q and k into features:
#   "softmax_kernel": Gaussian random features times the exp(|k|^2 / 2 sigma^2) magnitude
#                     factor, an unbiased estimate of exp(q.k / sigma^2) (SecFwT's form);
#   "l2":             q and k are l2-normalised first, no magnitude factor (Peng et al. 2021);
#   "positive":       FAVOR+ positive features exp(w.x - |x|^2/2) (Choromanski et al. 2021).
RfaVariant = Literal["softmax_kernel", "l2", "positive"]
TrigMode = Literal["exact", "poly"]
# The order of the poly sin/cos products (`feature_maps.poly_sin_cos_unit`), the same values:
#   "stacked": each level's products in one op, the fewest rounds (ABY3 and CHEETAH pay
#              per output, so this is their cheapest too).
#   "reused":  one op per product, each value meeting its later products as the same
#              array: SEMI2K, which opens every operand, opens each value once with its
#              openings cached (`secfwt_jax.compile.openings`). 35% fewer feature bytes at
#              the same rounds with probabilistic truncation, 22% at 3 more rounds exact
#              (docs/cost.md section 12). A run spec picks it for SEMI2K.
TrigSchedule = Literal["stacked", "reused"]
# How attention computes exp of its non-positive arguments (softmax's weights after the row
# max is subtracted; the softmax_kernel variant's key factor):
#   "exact": jnp.exp (under SPU: its PADE exp, 1,936 B and 71 rounds per element, ABY3);
#   "poly":  `mpc_ops.exp_nonpositive`, p(y)^16 on the clipped argument, relative error
#            <= 1.1e-5 on [-16, 0], 1,004 B and 35.7 rounds per element (ABY3).
ExpImpl = Literal["exact", "poly"]
# How RFA's l2 norms (an rsqrt per q/k row) and normalisers (a reciprocal per query) are
# computed under MPC:
#   "bucketed": `mpc_ops.rsqrt_pow2` / `reciprocal_pow2`: one comparison op against every
#               power of two of the range, then a quadratic and a short series. About half
#               SPU's rounds (32 / 27 against 60 / 59 per op, ABY3), 3-4x its bytes per
#               element (docs/cost.md, section 8): for WAN, where rounds cost most.
#   "spu":      SPU's rsqrt / reciprocal plus one Newton step: the fewest bytes, for LAN.
# Both compute the same values to float32 rounding in plaintext. (LayerNorm, softmax's
# denominators and the loss always use the bucketed forms: few elements, so few bytes.)
InverseImpl = Literal["bucketed", "spu"]
# How the GeLU activations ("gelu", "gelu_new", "gelu_pytorch_tanh") are computed:
#   "piecewise": two comparisons and one even Chebyshev polynomial (max error 7.5e-4 over
#                the real line; about a fifth of the exact form's MPC bytes, see
#                `mpc_ops.gelu_piecewise` and docs/cost.md). The default: every model here
#                is built to run under MPC, and plaintext references must compute the
#                same function.
#   "exact":     jax.nn.gelu (erf or tanh form), for parity with Hugging Face.
#   "relu":      max(x, 0): one comparison and one select, 172 B per element under ABY3
#                (a fifth of "piecewise"), but a different function: max error 0.17 at
#                x = -0.75. A checkpoint must be adapted to it (`secfwt adapt`).
#   "quad":      MPCFormer's 0.125 x^2 + 0.25 x + 0.5 (152 B per element), only close to
#                GeLU on [-2, 2]; it too needs an adapted checkpoint.
GeluImpl = Literal["piecewise", "exact", "relu", "quad"]
GELU_IMPLS: tuple[str, ...] = ("piecewise", "exact", "relu", "quad")
# How SiLU (x sigmoid(x), Llama's SwiGLU gate) is computed; the same treatment as GeLU
# (`mpc_ops.silu_piecewise`, docs/cost.md for the measured bytes):
#   "exact":          jax.nn.silu (under SPU its sigmoid: an exp and a reciprocal); the
#                     library default, for parity with Hugging Face;
#   "piecewise":      relu outside [-10, 10], an even Chebyshev polynomial of degree 12 in
#                     x / 10 inside: max error 5.5e-4 over the real line;
#   "piecewise_lite": the same at degree 6 on [-8, 8]: max error 8.7e-3, fewer products;
#   "relu":           max(x, 0), a different function (needs an adapted checkpoint).
SiluImpl = Literal["exact", "piecewise", "piecewise_lite", "relu"]
SILU_IMPLS: tuple[str, ...] = ("exact", "piecewise", "piecewise_lite", "relu")

SUPPORTED_FAMILIES: tuple[str, ...] = ("bert", "roberta", "gpt2", "llama")
SUPPORTED_ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh", "silu")  # fmt: skip


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Which attention the model runs, and the RFA options.

    Attributes:
      kind: "softmax" (the reference) or "rfa".
      num_features: m, random directions per head; features are [sin, cos] so 2m wide
        (m wide for the positive variant).
      sigma: kernel bandwidth. Directions are w = g / sigma with g ~ N(0, I), so the
        trig features estimate exp(-|x - y|^2 / 2 sigma^2); sigma = 1 with the magnitude
        factor reproduces softmax's exp(q.k / sqrt(d)) in expectation.
      variant: see `RfaVariant`.
      trig: "exact" (jnp.sin / jnp.cos) or "poly" (bounded shared-power polynomial, cheap
        under MPC; see `feature_maps.poly_sin_cos`).
      poly_bound: B, the clip range [-B, B] of trig arguments that have no guaranteed
        bound (the softmax_kernel variant). The l2 variant never clips: |w^T x| <=
        max_j |w_j| since |x| <= 1, and that bound is used instead.
      poly_degree: degree of the base cosine polynomial (even); sine uses degree + 1. The
        full range is reached by the fewest double-angle steps that keep the error within
        `feature_maps.TRIG_TOLERANCE` (`feature_maps.num_doublings`). None, the default,
        picks the degree with the fewest MPC products at the bound
        (`feature_maps.cheapest_degree`: 8 at d = 32, 10 at d = 64; docs/cost.md section 9).
      seed: public seed of the random directions; fixed per layer and head, never trained.
      exp: see `ExpImpl`; the run spec defaults to "poly", the reference to "exact".
      inverse: see `InverseImpl` (RFA only).
      trig_schedule: see `TrigSchedule` (RFA with trig "poly" only).
    """

    kind: AttentionKind = "softmax"
    num_features: int = 64
    sigma: float = 1.0
    variant: RfaVariant = "l2"
    trig: TrigMode = "exact"
    poly_bound: float = 16.0
    poly_degree: int | None = None
    seed: int = 0
    exp: ExpImpl = "exact"
    inverse: InverseImpl = "bucketed"
    trig_schedule: TrigSchedule = "stacked"

    def __post_init__(self) -> None:
        _require(self.kind in ("softmax", "rfa"), "attention.kind", f"unknown {self.kind!r}")
        _require(self.num_features > 0, "attention.num_features", "must be positive")
        _require(self.sigma > 0, "attention.sigma", "must be positive")
        _require(
            self.variant in ("softmax_kernel", "l2", "positive"),
            "attention.variant",
            f"unknown {self.variant!r}",
        )
        _require(self.trig in ("exact", "poly"), "attention.trig", f"unknown {self.trig!r}")
        _require(self.exp in ("exact", "poly"), "attention.exp", f"unknown {self.exp!r}")
        _require(
            self.inverse in ("bucketed", "spu"), "attention.inverse", f"unknown {self.inverse!r}"
        )
        _require(
            self.trig_schedule in ("stacked", "reused"),
            "attention.trig_schedule",
            f"unknown {self.trig_schedule!r}",
        )
        _require(self.poly_bound > 0, "attention.poly_bound", "must be positive")
        _require(
            self.poly_degree is None or (self.poly_degree >= 2 and self.poly_degree % 2 == 0),
            "attention.poly_degree",
            "must be null (automatic) or an even integer >= 2",
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters shared by the BERT, RoBERTa, GPT-2 and Llama modules.

    Llama only: `num_kv_heads` (grouped-query attention; None: one per query head),
    `rope_theta` (rotary base), `tie_embeddings` (the LM head is the embedding table),
    `attention_bias`; `layer_norm_eps` is its RMSNorm epsilon, `silu_impl` its SiLU.
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    pad_token_id: int = 0
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    gelu_impl: GeluImpl = "piecewise"
    num_kv_heads: int | None = None
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: bool = False
    silu_impl: SiluImpl = "exact"

    def __post_init__(self) -> None:
        _require(
            self.family in SUPPORTED_FAMILIES,
            "model_type",
            f"unsupported {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}",
        )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_positions"):
            _require(getattr(self, name) > 0, name, "must be positive")
        _require(
            self.hidden_size % self.num_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_heads={self.num_heads}",
        )
        _require(
            0 <= self.pad_token_id < self.vocab_size,
            "pad_token_id",
            f"{self.pad_token_id} is outside the vocabulary (size {self.vocab_size})",
        )
        _require(
            self.activation in SUPPORTED_ACTIVATIONS,
            "hidden_act",
            f"unsupported {self.activation!r}; supported: {', '.join(SUPPORTED_ACTIVATIONS)}",
        )
        _require(
            self.gelu_impl in GELU_IMPLS,
            "gelu_impl",
            f"unknown {self.gelu_impl!r}; expected one of {', '.join(GELU_IMPLS)}",
        )
        _require(
            self.silu_impl in SILU_IMPLS,
            "silu_impl",
            f"unknown {self.silu_impl!r}; expected one of {', '.join(SILU_IMPLS)}",
        )
        kv = self.kv_heads
        _require(
            kv > 0 and self.num_heads % kv == 0,
            "num_key_value_heads",
            f"{kv} does not divide num_attention_heads={self.num_heads}",
        )
        _require(self.rope_theta > 0, "rope_theta", "must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention when fewer than `num_heads`)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def causal(self) -> bool:
        return self.family in ("gpt2", "llama")

    def with_attention(self, attention: AttentionConfig) -> ModelConfig:
        return dataclasses.replace(self, attention=attention)

    @classmethod
    def from_hf(
        cls,
        hf_config,
        attention: AttentionConfig | None = None,
        gelu_impl: GeluImpl = "exact",
        silu_impl: SiluImpl = "exact",
    ) -> ModelConfig:
        """Map a `transformers.PretrainedConfig` onto our config (by default its own
        activations, exactly; MPC-cheap forms are the caller's choice)."""
        config = cls._from_hf(hf_config, attention)
        return dataclasses.replace(config, gelu_impl=gelu_impl, silu_impl=silu_impl)

    @classmethod
    def _from_hf(cls, hf_config, attention: AttentionConfig | None) -> ModelConfig:
        family = getattr(hf_config, "model_type", None)
        attention = attention or AttentionConfig()
        if family == "gpt2":
            return cls(
                family="gpt2",
                vocab_size=hf_config.vocab_size,
                hidden_size=hf_config.n_embd,
                num_layers=hf_config.n_layer,
                num_heads=hf_config.n_head,
                intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
                max_positions=hf_config.n_positions,
                layer_norm_eps=hf_config.layer_norm_epsilon,
                activation=hf_config.activation_function,
                pad_token_id=_pad_id(hf_config),
                attention=attention,
            )
        if family == "llama":
            if getattr(hf_config, "rope_scaling", None):
                raise ValueError(f"rope_scaling: {hf_config.rope_scaling!r} is not supported (plain rotary positions only)")  # fmt: skip
            head_dim = getattr(hf_config, "head_dim", None)
            if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
                raise ValueError(f"head_dim: {head_dim} is not hidden_size / num_attention_heads (not supported)")  # fmt: skip
            return cls(
                family="llama",
                vocab_size=hf_config.vocab_size,
                hidden_size=hf_config.hidden_size,
                num_layers=hf_config.num_hidden_layers,
                num_heads=hf_config.num_attention_heads,
                intermediate_size=hf_config.intermediate_size,
                max_positions=hf_config.max_position_embeddings,
                layer_norm_eps=hf_config.rms_norm_eps,
                activation=hf_config.hidden_act,
                pad_token_id=_pad_id(hf_config),
                attention=attention,
                num_kv_heads=getattr(hf_config, "num_key_value_heads", None),
                rope_theta=float(getattr(hf_config, "rope_theta", 10000.0)),
                tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            )
        if family in ("bert", "roberta"):
            return cls(
                family=family,
                vocab_size=hf_config.vocab_size,
                hidden_size=hf_config.hidden_size,
                num_layers=hf_config.num_hidden_layers,
                num_heads=hf_config.num_attention_heads,
                intermediate_size=hf_config.intermediate_size,
                max_positions=hf_config.max_position_embeddings,
                type_vocab_size=hf_config.type_vocab_size,
                layer_norm_eps=hf_config.layer_norm_eps,
                activation=hf_config.hidden_act,
                pad_token_id=hf_config.pad_token_id or 0,
                attention=attention,
            )
        raise ValueError(
            f"model_type: unsupported {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


def _pad_id(hf_config) -> int:
    """The config's `pad_token_id`, else `eos_token_id` (a list: its first), else 0: the
    first that is a token of the vocabulary. Our decoders never read either id in the
    forward (positions count from 0 and padded positions are masked), so a GPT-2 config
    that keeps the default eos id 50256 beside a smaller vocabulary, or has none, loads as
    it does in transformers."""
    for field in ("pad_token_id", "eos_token_id"):
        value = getattr(hf_config, field, None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < hf_config.vocab_size:  # fmt: skip
            return value
    return 0
