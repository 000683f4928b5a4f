"""Data layer: local labelled text -> k-shot splits -> prompt-encoded numpy batches."""

from secfwt_jax.data.batching import encode, iterate_minibatches
from secfwt_jax.data.datasets import bundled_sentiment_csv, load_sentiment, sentiment_template
from secfwt_jax.data.loaders import DataError, LabelledText, load_labelled
from secfwt_jax.data.sampling import KShotSplits, k_shot_splits
from secfwt_jax.data.templates import PromptTemplate, single_token_id

__all__ = [
    "DataError",
    "KShotSplits",
    "LabelledText",
    "PromptTemplate",
    "bundled_sentiment_csv",
    "encode",
    "iterate_minibatches",
    "k_shot_splits",
    "load_labelled",
    "load_sentiment",
    "sentiment_template",
    "single_token_id",
]
