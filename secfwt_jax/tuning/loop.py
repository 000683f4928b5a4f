"""Plaintext training loops over a `TuningProblem`: SPSA, backprop, CMA-ES prompt search,
evaluation and the linear probe. The MPC runtime reuses the same step functions; these
loops are the plaintext reference it is checked against.

    problem = sets.build_problem(spec, classifier, params)
    train = prepare_batch(problem, encode(...))            # frozen-trunk cache, once
    trainable, history = train_spsa(problem, cycle_minibatches(train, 32, seed=0),
                                    SpsaConfig(eps=1e-3, num_directions=4),
                                    ScheduleConfig(peak=1e-4, total_steps=100), steps=100, seed=0)
    evaluate(problem, trainable, prepare_batch(problem, test))  # {'accuracy', 'loss'}

Batches passed to the loops are already `problem.prepare`d (`prepare_batch`): the frozen
lower layers then run once per example, not once per step.

Forward-pass accounting (`history[i]['forwards']`, cumulative, in forwards of one
minibatch): an SPSA step is 2K forwards; a CMA-ES generation is `population` forwards; a
backprop step counts as 3 forward-equivalents (forward + backward ~ 2x forward).

Directions: `train_spsa` draws z on the host with `spsa.directions(seed, step, ...)` by
default, because that is exactly what the MPC runtime feeds as a public input, so the
plaintext run is the reference trajectory of the secure one. `in_jit_directions=True`
switches to `spsa_step_seeded` (z drawn inside the jit from a key, never materialised
on the host, plaintext only). `memory_lean=True` runs `spsa_inplace.make_inplace_spsa_step`
with the same keys instead: MeZO's in-place form, peak memory about one forward pass
(same directions and trajectory as `in_jit_directions` up to float rounding, except on
leaves larger than its `chunk_elements`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secfwt_jax.data.batching import iterate_minibatches
from secfwt_jax.models.classifier import accuracy, cross_entropy, cross_entropy_loss
from secfwt_jax.models.heads import pool
from secfwt_jax.tuning import backprop, cmaes, spsa, spsa_inplace
from secfwt_jax.tuning.schedules import ScheduleConfig, make_schedule
from secfwt_jax.tuning.sets import TuningProblem

BatchSource = dict | Callable[[int], dict]  # a fixed batch, or step -> batch
LogFn = Callable[[str], None]
BACKPROP_FORWARD_EQUIVALENTS = 3


def problem_loss(problem: TuningProblem) -> spsa.LossFn:
    """Mean cross-entropy of `problem.logits`: (trainable, frozen, batch) -> []."""
    return cross_entropy_loss(problem.logits)


def _batch_at(source: BatchSource, step: int) -> dict:
    return source(step) if callable(source) else source


def _rows(batch: dict) -> int:
    return next(iter(batch.values())).shape[0]


def cycle_minibatches(batch: dict, batch_size: int, seed: int) -> Callable[[int], dict]:
    """step -> minibatch of `batch_size` rows, reshuffled every epoch (same shape each step,
    so the jitted step traces once). `batch_size >= rows` gives the full batch every step."""
    rows = _rows(batch)
    if batch_size >= rows:
        return lambda step: batch
    per_epoch = rows // batch_size
    cache: dict[int, list[dict]] = {}

    def at(step: int) -> dict:
        epoch, index = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = list(iterate_minibatches(batch, batch_size, seed, epoch, drop_last=True))
        return cache[epoch][index]

    return at


def _chunks(batch: dict, chunk: int) -> Iterator[dict]:
    rows = _rows(batch)
    for start in range(0, rows, chunk):
        yield {k: v[start : start + chunk] for k, v in batch.items()}


def prepare_batch(problem: TuningProblem, batch: dict, chunk: int = 64) -> dict:
    """`problem.prepare` applied in jitted chunks of `chunk` rows, as numpy (the cache)."""
    prepare = jax.jit(problem.prepare)
    parts = [jax.tree_util.tree_map(np.asarray, prepare(c)) for c in _chunks(batch, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate(problem: TuningProblem, trainable, batch: dict, chunk: int = 64) -> dict:
    """{'accuracy', 'loss'} of `trainable` on a prepared batch (computed in chunks)."""
    logits_fn = jax.jit(problem.logits)
    logits = np.concatenate(
        [np.asarray(logits_fn(trainable, problem.frozen, c)) for c in _chunks(batch, chunk)]
    )
    labels = batch["labels"]
    return {
        "accuracy": float(accuracy(logits, labels)),
        "loss": float(cross_entropy(logits, labels)),
    }


def _record(history, step, forwards, info, eval_fn, trainable, eval_every, last, log, name):
    entry = {"step": step, "forwards": forwards, "loss": float(info["loss"])}
    if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
        entry["eval"] = eval_fn(trainable)
    history.append(entry)
    if log and (last or "eval" in entry or step % 50 == 0):
        log(f"{name} step {step}: loss {entry['loss']:.4f} {entry.get('eval', '')}")


def train_spsa(
    problem: TuningProblem,
    batches: BatchSource,
    spsa_cfg: spsa.SpsaConfig,
    schedule_cfg: ScheduleConfig,
    steps: int,
    seed: int,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    log: LogFn | None = None,
    in_jit_directions: bool = False,
    memory_lean: bool = False,
) -> tuple[dict, list[dict]]:
    """`steps` SPSA steps; returns (trainable, history of {step, forwards, loss[, eval]}).

    The step is jitted once; the step size (a public scalar) is evaluated on the host.
    `memory_lean` implies in-jit directions (keyed as `in_jit_directions`); it copies
    `problem.trainable` once, because the in-place step invalidates (donates) its input.
    """
    loss_fn, schedule = problem_loss(problem), make_schedule(schedule_cfg)
    k = spsa_cfg.num_directions
    in_jit_directions = in_jit_directions or memory_lean
    if memory_lean:
        step_fn = spsa_inplace.make_inplace_spsa_step(loss_fn, spsa_cfg)
        base_key = jax.random.PRNGKey(seed)
    elif in_jit_directions:
        step_fn = jax.jit(
            lambda t, f, b, key, lr: spsa.spsa_step_seeded(loss_fn, t, f, b, key, lr, spsa_cfg)
        )
        base_key = jax.random.PRNGKey(seed)
    else:
        step_fn = jax.jit(lambda t, f, b, z, lr: spsa.spsa_step(loss_fn, t, f, b, z, lr, spsa_cfg))
    trainable, history = problem.trainable, []
    if memory_lean:
        trainable = jax.tree_util.tree_map(jnp.array, trainable)
    for step in range(steps):
        lr = np.float32(schedule(step))
        if in_jit_directions:
            noise = jax.random.fold_in(base_key, step)
        else:
            noise = spsa.directions(seed, step, trainable, k)
        trainable, info = step_fn(trainable, problem.frozen, _batch_at(batches, step), noise, lr)
        last = step == steps - 1
        forwards = 2 * k * (step + 1)
        _record(history, step, forwards, info, eval_fn, trainable, eval_every, last, log, "spsa")
    return trainable, history


def train_backprop(
    problem: TuningProblem,
    batches: BatchSource,
    optimizer: str,
    schedule_cfg: ScheduleConfig,
    steps: int,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    log: LogFn | None = None,
) -> tuple[dict, list[dict]]:
    """`steps` gradient steps with optax `optimizer` ('sgd' | 'adam') on the schedule."""
    opt = backprop.make_optimizer(optimizer, make_schedule(schedule_cfg))
    step_fn = backprop.make_backprop_step(problem_loss(problem), opt)
    trainable = problem.trainable
    opt_state, history = opt.init(trainable), []
    for step in range(steps):
        batch = _batch_at(batches, step)
        trainable, opt_state, info = step_fn(trainable, problem.frozen, batch, opt_state)
        last = step == steps - 1
        forwards = BACKPROP_FORWARD_EQUIVALENTS * (step + 1)
        _record(history, step, forwards, info, eval_fn, trainable, eval_every, last, log, "bp")
    return trainable, history


def train_cma_prompt(
    problem: TuningProblem,
    batches: BatchSource,
    cma_cfg: cmaes.CmaConfig,
    log: LogFn | None = None,
) -> tuple[dict, list[dict]]:
    """CMA-ES over the subspace prompt z (`problem.spec.kind == 'prompt'`).

    Each generation's candidates are scored by ONE batched forward
    (`evaluate_population` over stacked {'z': [P, d]}). Returns ({'z': the search
    distribution's mean}, history); see `cmaes.solution` for why not the best candidate.
    """
    if set(problem.trainable) != {"z"}:
        raise ValueError("train_cma_prompt: needs a 'prompt' problem (trainable {'z'})")
    loss_fn = problem_loss(problem)
    population_fn = jax.jit(
        lambda cands, f, b: spsa.evaluate_population(loss_fn, {"z": cands}, f, b)
    )

    def population_loss(candidates: np.ndarray, generation: int) -> np.ndarray:
        batch = _batch_at(batches, generation)
        return np.asarray(population_fn(candidates, problem.frozen, batch))

    x0 = np.asarray(problem.trainable["z"])
    result = cmaes.cma_search(population_loss, x0.size, cma_cfg, x0=x0, log=log)
    history = [
        {**h, "forwards": cma_cfg.population * (h["generation"] + 1)} for h in result.history
    ]
    return {"z": jnp.asarray(result.mean_z)}, history


def pooled_features(classifier, params, batch: dict, chunk: int = 64) -> np.ndarray:
    """Mean-pooled trunk features [B, H] of a raw (unprepared) batch, in jitted chunks."""

    @jax.jit
    def features(b):
        hidden, mask = classifier.hidden(params, b)
        return pool(hidden, mask, "mean")

    return np.concatenate([np.asarray(features(c)) for c in _chunks(batch, chunk)])


def linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-4,
) -> dict:
    """Logistic regression on frozen features: {'kernel': [H, C], 'bias': [C]}.

    Full-batch Adam on mean cross-entropy + l2/2 |W|^2, inside one jitted `lax.scan`.
    features: [B, H]; labels: one-hot [B, C]. Features are not standardised, so the
    returned head drops straight into the classifier's linear head.
    """
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    head = {
        "kernel": jnp.zeros((features.shape[1], labels.shape[1]), jnp.float32),
        "bias": jnp.zeros(labels.shape[1], jnp.float32),
    }
    opt = optax.adam(learning_rate)

    def loss(h):
        logits = features @ h["kernel"] + h["bias"]
        return cross_entropy(logits, labels) + 0.5 * l2 * jnp.sum(h["kernel"] ** 2)

    def step(carry, _):
        h, state = carry
        grads = jax.grad(loss)(h)
        updates, state = opt.update(grads, state, h)
        return (optax.apply_updates(h, updates), state), None

    (head, _), _ = jax.jit(lambda h: jax.lax.scan(step, (h, opt.init(h)), None, length=steps))(head)
    return jax.tree_util.tree_map(np.asarray, head)
