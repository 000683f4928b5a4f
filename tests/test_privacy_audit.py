"""The membership-inference audit (`tuning.audit`): the (epsilon, delta) bound on any
attack's AUC against a hand computation, the AUC itself, and one audit cell: DP-SPSA at
epsilon = 1 stays under the bound while the same run without noise, which memorises,
does not (so the audit can see a leak)."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from secfwt_jax.tuning import audit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from privacy_audit import audit_once  # noqa: E402


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_the_auc_bound_at_delta_zero_is_the_logistic_of_epsilon(epsilon):
    # ROC under TPR <= e^eps FPR and 1 - FPR <= e^eps (1 - TPR): the lines meet at
    # FPR = 1 / (1 + e^eps); the area is e^eps / (1 + e^eps).
    assert audit.auc_bound(epsilon, 0.0) == pytest.approx(1 / (1 + math.exp(-epsilon)), abs=1e-6)


def test_the_bound_grows_with_delta_and_the_tpr_line_is_the_dp_inequality():
    assert audit.auc_bound(1.0, 1e-3) > audit.auc_bound(1.0, 1e-5) > audit.auc_bound(1.0, 0.0)
    f = np.array([0.0, 0.1, 0.5])
    want = np.minimum(np.minimum(math.e * f + 0.01, 1 - (1 - 0.01 - f) / math.e), 1)
    np.testing.assert_allclose(audit.tpr_bound(f, 1.0, 0.01), want)
    with pytest.raises(ValueError, match="^auc_bound"):
        audit.auc_bound(-1.0, 0.0)


def test_membership_auc_counts_pairs_and_half_ties():
    assert audit.membership_auc([3, 2], [1, 0]) == 1.0
    assert audit.membership_auc([0], [1]) == 0.0
    assert audit.membership_auc([1, 1], [1, 0]) == 0.75
    with pytest.raises(ValueError, match="^membership_auc"):
        audit.membership_auc([], [1])


def test_dp_spsa_at_epsilon_one_stays_under_the_bound_and_without_noise_it_leaks():
    logging.getLogger("absl").setLevel(logging.ERROR)
    private, leaky = audit_once(1.0, seed=0), audit_once(math.inf, seed=0)
    bound = audit.auc_bound(1.0, 1e-5)
    assert private["noise_multiplier"] > 1 and leaky["noise_multiplier"] == 0
    assert private["auc"] <= bound, (private, bound)
    assert leaky["member_accuracy"] == 1.0  # random labels: only memorisation fits them
    assert leaky["auc"] > bound + 0.1, (leaky, bound)
