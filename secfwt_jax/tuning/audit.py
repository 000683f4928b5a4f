"""A membership-inference audit of a tuned model, against what (epsilon, delta)-DP allows.

(epsilon, delta)-DP bounds every test that tells whether one example was in the training
set: at each threshold, TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta
(Kairouz, Oh and Viswanath 2015). The best ROC those two lines allow has an area,
`auc_bound(epsilon, delta)`; no attack's AUC can exceed it in expectation.

The audit is the loss-threshold attack (Yeom et al. 2018) in one training run: candidate
rows are split at random into members (trained on) and non-members (held out, the same
distribution); each is scored by its negative loss under the tuned parameters, and
`membership_auc` is the attack's area under the ROC. A random split is what makes one run
an audit (each row's membership is a fair coin the attacker must guess; Steinke, Nasr
and Jagielski 2023). A private run must stay under the bound; a non-private run that
memorises should not, which is what shows the audit can see a leak
(`tests/test_privacy_audit.py`, `benchmarks/privacy_audit.py`).
"""

from __future__ import annotations

import math

import numpy as np


def membership_auc(member_scores, nonmember_scores) -> float:
    """P(score of a random member > score of a random non-member), ties counting half:
    the attack's AUC (Mann-Whitney U over both sets' sizes)."""
    members = np.asarray(member_scores, np.float64).ravel()
    others = np.asarray(nonmember_scores, np.float64).ravel()
    if members.size == 0 or others.size == 0:
        raise ValueError("membership_auc: needs at least one member and one non-member score")
    greater = (members[:, None] > others[None, :]).sum()
    ties = (members[:, None] == others[None, :]).sum()
    return float((greater + 0.5 * ties) / (members.size * others.size))


def tpr_bound(fpr, epsilon: float, delta: float) -> np.ndarray:
    """The largest true-positive rate (epsilon, delta)-DP allows at false-positive rate `fpr`."""
    f = np.asarray(fpr, np.float64)
    e = math.exp(epsilon) if math.isfinite(epsilon) else math.inf
    first = e * f + delta if math.isfinite(e) else np.where(f > 0, 1.0, delta)
    second = 1.0 - (1.0 - delta - f) / e if math.isfinite(e) else 1.0
    return np.clip(np.minimum(np.minimum(first, second), 1.0), 0.0, 1.0)


def auc_bound(epsilon: float, delta: float, points: int = 200_001) -> float:
    """The area under `tpr_bound`: the most AUC any membership attack can have under
    (epsilon, delta)-DP (0.5 at epsilon = delta = 0; 1 as epsilon grows)."""
    if epsilon < 0 or not 0 <= delta < 1:
        raise ValueError(f"auc_bound: needs epsilon >= 0 and delta in [0, 1), got {epsilon}, {delta}")  # fmt: skip
    f = np.linspace(0.0, 1.0, points)
    return float(np.trapz(tpr_bound(f, epsilon, delta), f))


def dp_spsa_train(
    per_example_loss,
    theta,
    frozen,
    rows: dict,
    *,
    steps: int,
    rate: float,
    max_rows: int,
    spsa_config,
    clip: float,
    noise_multiplier: float,
    step_size: float,
    seed: int,
    private_seed: int,
):
    """Plaintext DP-SPSA over `rows` ({name: [n, ...]}) as a private run does it: a Poisson
    batch padded to `max_rows` and N(0, 1) noise per direction from `private_seed`, public
    directions from `seed` (`privacy.dp_spsa_step`). noise_multiplier 0 is the same run
    without noise (clipped, not private): the audit's positive control."""
    import jax

    from .privacy import dp_spsa_step, noise_draw, sampled_batch
    from .spsa import directions

    num_rows = len(next(iter(rows.values())))
    k = spsa_config.num_directions
    step = jax.jit(
        lambda t, b, z, n: dp_spsa_step(
            per_example_loss,
            t,
            frozen,
            b,
            z,
            n,
            step_size,
            spsa_config,
            clip,
            noise_multiplier,
            rate * num_rows,
        )  # fmt: skip
    )
    rng = np.random.default_rng([private_seed, 29])
    for i in range(steps):
        batch = sampled_batch(rng, rows, rate, max_rows)
        z = directions(seed, i, theta, k, spsa_config.directions)
        theta, _ = step(theta, batch, z, noise_draw(rng, k))
    return theta


def loss_attack_auc(per_example_loss, theta, frozen, rows: dict, members) -> float:
    """The loss-threshold attack's AUC: rows scored by their negative loss under `theta`,
    `members` [n] marking those trained on."""
    scores = -np.asarray(per_example_loss(theta, frozen, rows))
    members = np.asarray(members, bool)
    return membership_auc(scores[members], scores[~members])


__all__ = ["auc_bound", "dp_spsa_train", "loss_attack_auc", "membership_auc", "tpr_bound"]
