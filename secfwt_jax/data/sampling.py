"""Few-shot splits in the LM-BFF style: k examples per class for train and for dev, plus a
held-out test sample, all disjoint and fixed by a seed.

    splits = k_shot_splits(data, k=16, seed=13, test_size=1000)
    splits.train   # LabelledText, exactly 16 rows per class
    splits.dev     # LabelledText, exactly 16 rows per class (dev_k)
    splits.test    # LabelledText, 1000 rows drawn from the remaining rows
    splits.train_rows, splits.dev_rows, splits.test_rows   # int64 row indices into `data`

LM-BFF draws its few-shot sets with seeds 13, 21, 42, 87 and 100; any integer works.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from secfwt_jax.data.loaders import DataError, LabelledText


@dataclasses.dataclass(frozen=True)
class KShotSplits:
    """Disjoint train / dev / test subsets of one LabelledText, with their row indices."""

    train: LabelledText
    dev: LabelledText
    test: LabelledText
    train_rows: np.ndarray
    dev_rows: np.ndarray
    test_rows: np.ndarray


def k_shot_splits(
    data: LabelledText,
    k: int,
    seed: int,
    *,
    dev_k: int | None = None,
    test_size: int | None = 1000,
    stratify_test: bool = False,
) -> KShotSplits:
    """Sample k-shot train and dev sets per class and a held-out test set.

    Args:
      data: the full labelled set (R rows).
      k: training rows per class.
      seed: fixes every draw; the same seed gives the same splits.
      dev_k: dev rows per class (default k, as in LM-BFF).
      test_size: test rows drawn from the rows left after train and dev; None takes them all.
      stratify_test: draw test_size // C rows per class instead of a uniform sample.

    Returns:
      KShotSplits; each split keeps `data.label_names`, rows in source order.
    """
    dev_k = k if dev_k is None else dev_k
    if k < 1 or dev_k < 0:
        raise DataError(f"k-shot: need k >= 1 and dev_k >= 0, got k={k}, dev_k={dev_k}")
    rng = np.random.default_rng(seed)
    train, dev, rest = [], [], []
    for c, name in enumerate(data.label_names):
        rows = np.flatnonzero(data.labels == c)
        if rows.size < k + dev_k:
            raise DataError(
                f"k-shot: class {name!r} has {rows.size} rows, needs {k + dev_k} "
                f"(k={k} train + dev_k={dev_k} dev)"
            )
        rows = rng.permutation(rows)
        train.append(rows[:k])
        dev.append(rows[k : k + dev_k])
        rest.append(rows[k + dev_k :])
    test = _test_rows(data, rest, test_size, stratify_test, rng)
    train_rows, dev_rows = np.sort(np.concatenate(train)), np.sort(np.concatenate(dev))
    return KShotSplits(
        train=data.subset(train_rows),
        dev=data.subset(dev_rows),
        test=data.subset(test),
        train_rows=train_rows,
        dev_rows=dev_rows,
        test_rows=test,
    )


def _test_rows(data, rest, test_size, stratify, rng) -> np.ndarray:
    """Row indices of the test sample, drawn from the per-class leftovers `rest`."""
    if test_size is None:
        return np.sort(np.concatenate(rest))
    if not stratify:
        pool = np.concatenate(rest)
        if pool.size < test_size:
            raise DataError(
                f"k-shot: test_size={test_size} but only {pool.size} rows are left "
                "(pass a smaller test_size, or None for all of them)"
            )
        return np.sort(rng.choice(pool, size=test_size, replace=False))
    per_class = test_size // data.num_labels
    picked = []
    for name, rows in zip(data.label_names, rest, strict=True):
        if rows.size < per_class:
            raise DataError(
                f"k-shot: class {name!r} has {rows.size} rows left for test, "
                f"needs {per_class} (stratified test_size={test_size})"
            )
        picked.append(rng.choice(rows, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))
