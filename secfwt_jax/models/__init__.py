"""Flax BERT, RoBERTa and GPT-2 with pluggable softmax or random feature attention."""

from secfwt_jax.models.attention import attend, random_feature_attention, softmax_attention
from secfwt_jax.models.checkpoint import (
    CheckpointError,
    bundled_minilm_dir,
    load_pretrained,
    load_tokenizer,
)
from secfwt_jax.models.classifier import Classifier, accuracy, cross_entropy
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig

__all__ = [
    "AttentionConfig",
    "CheckpointError",
    "Classifier",
    "HeadConfig",
    "ModelConfig",
    "accuracy",
    "attend",
    "bundled_minilm_dir",
    "cross_entropy",
    "load_pretrained",
    "load_tokenizer",
    "random_feature_attention",
    "softmax_attention",
]
