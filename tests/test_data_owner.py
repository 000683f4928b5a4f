"""The data owner's split: stratified test rows and a class-balanced, shuffled MPC subset.

The bundled sentiment corpus is sorted by label, so any selection in source order would be
single-class; these tests run on it through the shipped spec."""

from pathlib import Path

import numpy as np

from secfwt_jax.models.checkpoint import load_tokenizer
from secfwt_jax.run import build
from secfwt_jax.run.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "minilm_sentiment.yaml"


def test_mpc_eval_rows_are_balanced_shuffled_and_seeded():
    labels = np.repeat([0, 1], [30, 70])  # label-sorted, unbalanced
    rows = build.mpc_eval_rows(labels, 20, seed=3)
    assert np.bincount(labels[rows]).tolist() == [10, 10]
    assert len(set(rows.tolist())) == 20
    assert not np.array_equal(np.sort(rows), rows)  # not source order
    assert np.array_equal(rows, build.mpc_eval_rows(labels, 20, seed=3))
    assert not np.array_equal(rows, build.mpc_eval_rows(labels, 20, seed=4))
    # a class that runs out leaves the rest to the others
    assert np.bincount(labels[build.mpc_eval_rows(labels, 80, seed=3)]).tolist() == [30, 50]


def test_the_shipped_spec_evaluates_a_balanced_subset_of_a_stratified_test_split():
    spec = load_spec(SHIPPED)
    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    data = build.data_owner_inputs(spec, tokenizer, None)
    per_class = spec.data.test_size // len(spec.data.labels)
    assert data.test.counts() == {name: per_class for name in spec.data.labels}
    n = spec.evaluation.mpc_examples
    assert np.bincount(data.eval_labels, minlength=2).tolist() == [n // 2, n // 2]
    # the evaluated features are those of the labelled rows, not of the first test rows
    chosen = build.mpc_eval_rows(data.test.labels, n, spec.data.seed)
    first = build._encode(spec, data.test, chosen[: spec.evaluation.batch_size], tokenizer, None)
    assert np.array_equal(first["input_ids"], data.eval_inputs[0]["input_ids"])
