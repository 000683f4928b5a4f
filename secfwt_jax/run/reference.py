"""The plaintext reference of a run: the same programs, seeds and chunks, in the clear.

It reads both owners' secrets, so only an operator process that legitimately holds both
(the in-process simulator run, a test) may call it; no party of a real deployment can.
It answers the questions a privacy team asks of an MPC run: does MPC compute what
plaintext computes (loss, predictions, parameters), and what is the accuracy on the whole
test split, not just the subset evaluated under MPC.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from secfwt_jax.run import build
from secfwt_jax.run.spec import RunSpec
from secfwt_jax.tuning.schedules import make_schedule


def _jit(program: build.ProgramDef | None):
    return None if program is None else jax.jit(program.fn)


def _features(trunk, frozen, inputs: list[dict]) -> list[dict]:
    return inputs if trunk is None else [trunk(frozen, x) for x in inputs]


def _predict_all(predict, theta, frozen, feats) -> np.ndarray:
    return np.concatenate([np.asarray(predict(theta, frozen, x)) for x in feats], axis=0)


def full_test_inputs(spec: RunSpec, data: build.DataOwnerInputs, tokenizer) -> list[dict]:
    """The whole plaintext test split, tokenised with int ids, in evaluation-size chunks."""
    size = spec.evaluation.batch_size
    rows = np.arange(len(data.test))
    chunks = []
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        batch = build._encode(spec, data.test, part, tokenizer, None)
        chunks.append({k: v for k, v in batch.items() if k != "labels"})
    return chunks


def plaintext_reference(
    spec: RunSpec,
    programs: build.RunPrograms,
    theta: dict,
    frozen: dict,
    data: build.DataOwnerInputs,
    tokenizer,
    dp_seed: int | None = None,
) -> dict[str, Any]:
    """Losses, predictions and accuracies of the plaintext run, and its final theta. A
    private run replays the data owner's samples and noise from its `dp_seed`."""
    trunk, predict = _jit(programs.trunk), _jit(programs.predict)
    lower, frozen = programs.frozen_parts(frozen)
    train_x = _features(trunk, lower, data.train_inputs)
    eval_x = _features(trunk, lower, data.eval_inputs)  # jit retraces per shape
    test_x = _features(trunk, lower, full_test_inputs(spec, data, tokenizer))
    n = len(data.eval_labels)

    def scores(t) -> dict[str, Any]:
        sub = np.argmax(_predict_all(predict, t, frozen, eval_x)[:n], -1)
        full = np.argmax(_predict_all(predict, t, frozen, test_x)[: len(data.test)], -1)
        return {
            "predictions": sub.tolist(),
            "accuracy": float(np.mean(sub == data.eval_labels)),
            "full_test_accuracy": float(np.mean(full == data.test.labels)),
        }

    before, initial = scores(theta), theta
    losses: list[float] = []
    if spec.tuning.method == "spsa":
        step = jax.jit(programs.step.fn)
        schedule = make_schedule(spec.tuning.schedule_config())
        for i in range(spec.tuning.steps):
            z = build.step_directions(spec, i, programs.problem.trainable)
            lr = np.float32(schedule(i))
            if programs.privacy is None:
                c = i % len(train_x)
                theta, loss = step(theta, frozen, train_x[c], data.train_labels[c], z, lr)
            else:
                from secfwt_jax.run.privacy import data_owner_draws

                pick, included, noise = data_owner_draws(dp_seed, i, programs.privacy)
                theta, loss = step(theta, frozen, *train_x, *data.train_labels, pick, included, z, noise, lr)  # fmt: skip
            losses.append(float(loss))
        theta = jax.tree_util.tree_map(np.asarray, theta)
    else:  # CMA-ES with the same seed; candidates and rankings may drift from the MPC run's
        from secfwt_jax.tuning import cmaes

        population_loss = jax.jit(programs.population_loss.fn)
        es = cmaes.start_strategy(spec.tuning.trainable.intrinsic_dim, spec.tuning.cma_config(spec.seed))  # fmt: skip
        for g in range(spec.tuning.steps):
            candidates = cmaes.ask(es)
            k = g % len(train_x)
            values = np.asarray(population_loss({"z": candidates}, frozen, train_x[k], data.train_labels[k]))  # fmt: skip
            cmaes.tell(es, candidates, values)
            losses.append(float(values.min()))
        theta = cmaes.solution(es)
    after = scores(theta)
    change = relative_gap(build.flatten(theta), build.flatten(initial))
    return {"before": before, "after": after, "losses": losses, "theta": theta, "relative_param_change": change}  # fmt: skip


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two prediction lists agree."""
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def relative_gap(a: dict, b: dict, origin: dict | None = None) -> float:
    """||a - b|| / ||b|| over all leaves of two flat {'path': array} dicts; with `origin`,
    ||a - b|| / ||b - origin||: the gap relative to how far b moved from origin."""
    num = sum(float(np.sum((np.asarray(a[k]) - np.asarray(b[k])) ** 2)) for k in b)
    base = {k: np.asarray(b[k]) - (0.0 if origin is None else np.asarray(origin[k])) for k in b}
    den = sum(float(np.sum(v**2)) for v in base.values())
    return float(np.sqrt(num / max(den, 1e-30)))


__all__ = ["agreement", "full_test_inputs", "plaintext_reference", "relative_gap"]
