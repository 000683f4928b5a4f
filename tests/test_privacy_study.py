"""DP-SGD (`tuning.dp_sgd`) against a hand computation and its noise scale, the study's
splits, and one small privacy study on the real MiniLM and corpus (`run.privacy_study`):
the accountant's noise, the audit under its bound, and a non-private run above chance."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from secfwt_jax.run import privacy_study
from secfwt_jax.tuning import dp_sgd, privacy

ROOT = Path(__file__).resolve().parents[1]


def centre_loss(t, f, b):
    """L_i(w) = 0.5 ||w - x_i||^2: each row's gradient is w - x_i."""
    del f
    return 0.5 * ((t["w"][None, :] - b["x"]) ** 2).sum(axis=1)


def test_dp_sgd_clips_each_rows_gradient_in_l2_adds_scaled_noise_and_divides_by_the_expected_batch():
    w = np.zeros(2, np.float32)
    x = np.array([[3.0, 4.0], [0.3, 0.4], [100.0, 0.0]], np.float32)  # norms 5, 0.5; padding
    batch = {"x": x, "included": np.array([1, 1, 0], np.float32)}
    noise = np.array([1.0, -1.0], np.float32)
    new, info = dp_sgd.dp_sgd_step(centre_loss, {"w": w}, {}, batch, noise, 0.1, clip=1.0,
                                   noise_multiplier=2.0, expected_batch=2.0)  # fmt: skip
    # By hand: gradients -x_i; row 0 scaled to norm 1 (-0.6, -0.8), row 1 kept, padding dropped.
    total = np.array([-0.6, -0.8]) + np.array([-0.3, -0.4]) + 2.0 * 1.0 * noise
    np.testing.assert_allclose(np.asarray(info["grad"]), total / 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["w"]), -0.1 * total / 2.0, rtol=1e-6)
    assert int(info["clipped"]) == 1  # row 0 only; the padding row is not counted


def test_dp_sgd_noise_has_standard_deviation_sigma_clip_over_the_batch():
    w = np.zeros(20_000, np.float32)
    batch = {"x": np.zeros((1, w.size), np.float32), "included": np.zeros(1, np.float32)}
    noise = np.random.default_rng(0).standard_normal(w.size).astype(np.float32)
    new, _ = dp_sgd.dp_sgd_step(centre_loss, {"w": w}, {}, batch, noise, 1.0, clip=0.5,
                                noise_multiplier=3.0, expected_batch=4.0)  # fmt: skip
    assert np.std(np.asarray(new["w"])) == pytest.approx(3.0 * 0.5 / 4.0, rel=0.02)


def test_study_splits_are_disjoint_balanced_and_balanced_in_every_prefix():
    labels = np.array([0] * 70 + [1] * 30)
    train, holdout, test = privacy_study.balanced_splits(labels, (20, 10, 30), seed=1)
    assert len(set(train) | set(holdout) | set(test)) == 60
    for rows in (train, holdout, test):
        assert np.bincount(labels[rows]).tolist() == [len(rows) // 2] * 2
    assert np.bincount(labels[train[:6]]).tolist() == [3, 3]  # the audit takes a prefix
    with pytest.raises(ValueError, match="fewer than 31 rows"):
        privacy_study.balanced_splits(labels, (20, 10, 32), seed=1)


# About 55 s on 2 cores (600 rows through the real MiniLM trunk). The default run keeps
# the accountant (test_privacy.py), the audit bound (test_privacy_audit.py) and the private
# step under MPC (test_privacy_run.py); this is the study runner end to end.
@pytest.mark.slow
def test_a_small_study_on_minilm_calibrates_the_noise_and_stays_under_the_audit_bound():
    """200 real training rows through the real MiniLM's trunk, epsilon 1 and no privacy:
    the noise multiplier spends epsilon = 1 (K directions composed as sigma / sqrt(K)),
    each private cell's attack AUC stays under its bound, and tuning beats chance."""
    from secfwt_jax.run.spec import load_spec

    logging.getLogger("absl").setLevel(logging.ERROR)
    config = privacy_study.StudyConfig(
        train_rows=200, audit_rows=100, test_rows=200, validation_rows=100,
        epsilons=(1.0, math.inf), seeds=(0,), steps=150, batch_size=32,
        spsa_step_sizes=(0.2,), sgd_step_sizes=(0.5,), clipped_baseline=False,
    )  # fmt: skip
    spec = load_spec(ROOT / "configs" / "minilm_sentiment.yaml")
    study = privacy_study.run_study(spec, config, log=lambda m: None)
    rows = {(r["method"], r["epsilon"]): r for r in study["rows"]}
    assert len(rows) == 4 and study["delta"] == pytest.approx(200**-1.1)
    k = spec.tuning.spsa.num_directions
    for method, directions in (("dp-spsa", k), ("dp-sgd", 1)):
        private = rows[(method, 1.0)]
        spent = privacy.epsilon_spent(private["noise_multiplier"], 32 / 200, 150, study["delta"], directions)  # fmt: skip
        assert spent == pytest.approx(1.0, abs=0.02)
        assert private["audit_auc"] < private["auc_bound"]
        assert rows[(method, math.inf)]["noise_multiplier"] == 0.0
        assert rows[(method, math.inf)]["test_accuracy"] > 0.6, rows[(method, math.inf)]
    # DP-SPSA's multiplier per direction is sqrt(K) times DP-SGD's for the same epsilon
    ratio = rows[("dp-spsa", 1.0)]["noise_multiplier"] / rows[("dp-sgd", 1.0)]["noise_multiplier"]
    assert ratio == pytest.approx(math.sqrt(k), rel=1e-3)
    summary = privacy_study.summarise(study["rows"])
    assert "| dp-spsa | 1 |" in privacy_study.markdown_table(summary)
