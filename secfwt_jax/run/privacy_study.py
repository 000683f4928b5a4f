"""The utility price of `tuning.privacy`, measured in plaintext with the step functions a
private run compiles: test accuracy and a membership audit at each epsilon, for DP-SPSA
(forward-only, DP-ZO's mechanism) and DP-SGD (backprop, per-example clipping) on the same
trainable set, sampler, accountant and delta.

    rows = run_study(load_spec("configs/minilm_sentiment.yaml"), StudyConfig())

The spec gives the model (its checkpoint, attention and fresh linear head from each
seed's private seed), the corpus, max_len and the SPSA directions; the study sizes the
data itself, because differential privacy needs thousands of rows where the MPC main run
trains on 48. The frozen trunk runs once per row, in plaintext (`cache_trunk`).

Splits of the data owner's file, each class-balanced and disjoint:
- train: what the run tunes on; `audit_rows` of it are the audit's members;
- holdout: as many non-members from the same distribution, never trained on;
- test: the accuracy;
- validation: picks each method's step size from a small grid (at one epsilon and seed).

The audit is the loss-threshold attack (`tuning.audit`): its AUC over members against
non-members, beside the largest AUC that (epsilon, delta + overflow) allows.

What is NOT accounted: the step-size selection reads the validation rows (as a private
hyperparameter search would, at a privacy cost this study leaves out); the clips are fixed
constants. Nothing is tuned on the test rows.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from secfwt_jax.data import encode
from secfwt_jax.models.checkpoint import load_tokenizer
from secfwt_jax.models.classifier import per_example_loss
from secfwt_jax.run import build
from secfwt_jax.run.spec import RunSpec
from secfwt_jax.tuning import audit, dp_sgd, loop, privacy, sets
from secfwt_jax.tuning.spsa import SpsaConfig

METHODS = ("dp-spsa", "dp-sgd")
NO_CLIP = 1e30  # epsilon = inf: a clip no row reaches (and sigma * clip stays 0, not nan)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes and constants of the study. epsilon = inf is the same run without clipping or
    noise (the non-private baseline, with the same Poisson sampler)."""

    train_rows: int = 4000
    test_rows: int = 1000
    audit_rows: int = 1000  # members drawn from train; as many holdout non-members
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    steps: int = 1000
    batch_size: int = 64  # the expected Poisson batch q n
    clip_spsa: float = 1.0  # on each row's projected gradient (a scalar per direction)
    clip_sgd: float = 1.0  # on each row's gradient, L2
    # Each method's step size is the best of its grid on the validation rows, at
    # `select_at_epsilon` and the first seed; every other cell then uses it.
    spsa_step_sizes: tuple[float, ...] = (0.05, 0.2, 0.5)  # 0.05 is the main run's
    sgd_step_sizes: tuple[float, ...] = (0.2, 1.0, 3.0)
    select_at_epsilon: float = 2.0
    clipped_baseline: bool = True  # also run each method clipped but without noise
    validation_rows: int = 1000
    data_seed: int = 13

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"privacy study: unknown methods {sorted(unknown)}; use {METHODS}")
        if self.audit_rows > self.train_rows:
            raise ValueError("privacy study: audit_rows must not exceed train_rows")


@dataclasses.dataclass
class StudyData:
    """The cached trunk features of each split and the public facts every cell shares."""

    spec: RunSpec
    train: dict
    holdout: dict
    test: dict
    validation: dict
    delta: float
    problems: Callable[[int], sets.TuningProblem]  # seed -> the model with its fresh head


def balanced_splits(labels: np.ndarray, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Disjoint row indices, one array per size, each with size // C rows of every class,
    in class-interleaved order."""
    rng = np.random.default_rng([seed, 23])
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    need = sum(s // len(classes) for s in sizes)
    short = [int(c) for c, rows in zip(classes, per_class, strict=True) if len(rows) < need]
    if short:
        raise ValueError(f"privacy study: classes {short} have fewer than {need} rows for {sizes}")
    out, start = [], 0
    for size in sizes:
        take = size // len(classes)
        # interleaved class by class, so any prefix (the audit's members) is balanced too
        out.append(np.stack([rows[start : start + take] for rows in per_class], axis=1).ravel())
        start += take
    return out


def prepare(spec: RunSpec, config: StudyConfig, log: Callable[[str], None] = print) -> StudyData:
    """Load the corpus and the model, split, and run the frozen trunk once per row."""
    if spec.model.architecture is not None:
        raise ValueError("privacy study: needs a checkpoint (an inline model's trunk differs per seed)")  # fmt: skip

    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    head = build.head_config(spec, tokenizer)
    data = build.load_data(spec)
    sizes = (config.train_rows, config.audit_rows, config.test_rows, config.validation_rows)
    splits = balanced_splits(data.labels, sizes, config.data_seed)
    trainable = sets.TrainableSpec("head", cache_trunk=True)
    problems: dict[int, sets.TuningProblem] = {}

    def problem(seed: int) -> sets.TuningProblem:
        if seed not in problems:
            classifier, params = build.load_model(spec, head, private_seed=seed, log=lambda m: None)
            problems[seed] = sets.build_problem(trainable, classifier, params, seed=seed)
        return problems[seed]

    def features(rows: np.ndarray) -> dict:
        batch = encode([data.texts[i] for i in rows], data.labels[rows], tokenizer,
                       spec.data.max_len, num_labels=len(spec.data.labels))  # fmt: skip
        return loop.prepare_batch(problem(config.seeds[0]), batch)

    start = time.perf_counter()
    cached = [features(rows) for rows in splits]
    log(f"frozen trunk over {sum(map(len, splits))} rows: {time.perf_counter() - start:.0f} s")
    return StudyData(spec, *cached, privacy.default_delta(config.train_rows), problem)


def _noise_plan(method: str, epsilon: float, config: StudyConfig, delta: float, directions: int, clipped: bool):  # fmt: skip
    """(noise multiplier, clip, padded rows, overflow delta) of one cell."""
    rate = config.batch_size / config.train_rows
    clip = config.clip_spsa if method == "dp-spsa" else config.clip_sgd
    k = directions if method == "dp-spsa" else 1
    if not math.isfinite(epsilon):
        return 0.0, clip if clipped else NO_CLIP, privacy.padded_rows(config.train_rows, rate, config.steps, delta, 1.0), 0.0  # fmt: skip
    sigma = privacy.noise_multiplier_for(epsilon, delta, rate, config.steps, k)
    rows = privacy.padded_rows(config.train_rows, rate, config.steps, delta, epsilon)
    return sigma, clip, rows, privacy.overflow_delta(config.train_rows, rate, rows, config.steps, epsilon)  # fmt: skip


def run_cell(data: StudyData, method: str, epsilon: float, seed: int, config: StudyConfig, step_size: float, clipped: bool = False) -> dict:  # fmt: skip
    """Tune the fresh head of `seed` at `epsilon` with `method`; accuracies and audit.
    At epsilon = inf the run has no noise, and no clip unless `clipped`."""
    problem = data.problems(seed)
    loss = per_example_loss(problem.logits)
    spsa_config = data.spec.tuning.spsa
    sigma, clip, max_rows, overflow = _noise_plan(method, epsilon, config, data.delta, spsa_config.num_directions, clipped)  # fmt: skip
    rate = config.batch_size / config.train_rows
    start = time.perf_counter()
    common = dict(steps=config.steps, rate=rate, max_rows=max_rows, clip=clip, noise_multiplier=sigma)  # fmt: skip
    if method == "dp-spsa":
        theta = audit.dp_spsa_train(
            loss, problem.trainable, problem.frozen, data.train, spsa_config=SpsaConfig(
                eps=spsa_config.eps, num_directions=spsa_config.num_directions,
                directions=spsa_config.directions),
            step_size=step_size, seed=seed, private_seed=seed + 1000, **common,
        )  # fmt: skip
    else:
        theta = dp_sgd.dp_sgd_train(loss, problem.trainable, problem.frozen, data.train,
                                    step_size=step_size, private_seed=seed + 1000, **common)  # fmt: skip
    seconds = time.perf_counter() - start
    members = {k: v[: config.audit_rows] for k, v in data.train.items()}
    everyone = {k: np.concatenate([members[k], data.holdout[k]]) for k in members}
    is_member = np.arange(2 * config.audit_rows) < config.audit_rows
    total_delta = data.delta + overflow
    return {
        "method": method, "epsilon": epsilon, "seed": seed, "noise_multiplier": sigma,
        "step_size": step_size, "clip": clip if clip < NO_CLIP else None, "delta": data.delta, "total_delta": total_delta, "padded_rows": max_rows,
        "test_accuracy": loop.evaluate(problem, theta, data.test)["accuracy"],
        "train_accuracy": loop.evaluate(problem, theta, members)["accuracy"],
        "validation_accuracy": loop.evaluate(problem, theta, data.validation)["accuracy"],
        "audit_auc": audit.loss_attack_auc(loss, theta, problem.frozen, everyone, is_member),
        "auc_bound": audit.auc_bound(epsilon, total_delta) if math.isfinite(epsilon) else 1.0,
        "seconds": seconds,
    }  # fmt: skip


def select_step_sizes(data: StudyData, config: StudyConfig, log: Callable[[str], None] = print) -> dict[str, float]:  # fmt: skip
    """Each method's step size: the best validation accuracy of its grid at
    `select_at_epsilon` on the first seed (never the test rows)."""
    chosen = {}
    for method in config.methods:
        grid = config.spsa_step_sizes if method == "dp-spsa" else config.sgd_step_sizes
        scores = {lr: run_cell(data, method, config.select_at_epsilon, config.seeds[0], config, lr)["validation_accuracy"]  # fmt: skip
                  for lr in grid}  # fmt: skip
        chosen[method] = max(grid, key=lambda lr: scores[lr])
        log(f"{method} step size {chosen[method]:g} (validation accuracy by step size: "
            + ", ".join(f"{lr:g}: {a:.3f}" for lr, a in scores.items()) + ")")  # fmt: skip
    return chosen


def run_study(spec: RunSpec, config: StudyConfig, log: Callable[[str], None] = print) -> dict:
    """{step_sizes, rows}: the selected step sizes, then every (method, epsilon, seed) cell."""
    data = prepare(spec, config, log)
    step_sizes = select_step_sizes(data, config, log)
    rows = []
    cells = [(e, False) for e in config.epsilons] + ([(math.inf, True)] if config.clipped_baseline else [])  # fmt: skip
    for method in config.methods:
        for epsilon, clipped in cells:
            for seed in config.seeds:
                rows.append(run_cell(data, method, epsilon, seed, config, step_sizes[method], clipped))  # fmt: skip
                r = rows[-1]
                log(f"{method} epsilon {epsilon:g} seed {seed}: test {r['test_accuracy']:.3f}, "
                    f"audit AUC {r['audit_auc']:.3f} (bound {r['auc_bound']:.3f}), {r['seconds']:.0f} s")  # fmt: skip
    return {"step_sizes": step_sizes, "delta": data.delta, "rows": rows}


def _variant(row: dict) -> str:
    if math.isfinite(row["epsilon"]):
        return "private"
    return "no privacy" if row["clip"] is None else "clipped, no noise"


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (method, epsilon, variant): mean, min and max over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        for epsilon, variant in dict.fromkeys((r["epsilon"], _variant(r)) for r in mine):
            cell = [r for r in mine if r["epsilon"] == epsilon and _variant(r) == variant]
            acc = np.array([r["test_accuracy"] for r in cell])
            auc = np.array([r["audit_auc"] for r in cell])
            out.append({
                "method": method, "epsilon": epsilon, "variant": variant, "seeds": len(cell),
                "noise_multiplier": cell[0]["noise_multiplier"],
                "test_accuracy": float(acc.mean()), "test_accuracy_min": float(acc.min()),
                "test_accuracy_max": float(acc.max()),
                "audit_auc": float(auc.mean()), "audit_auc_max": float(auc.max()),
                "auc_bound": cell[0]["auc_bound"],
            })  # fmt: skip
    return out


def markdown_table(summary: list[dict]) -> str:
    lines = ["| method | epsilon | noise multiplier | test accuracy, mean (min-max) | audit AUC, mean (max) | AUC bound |",  # fmt: skip
             "|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        eps = f"{s['epsilon']:g}" if math.isfinite(s["epsilon"]) else f"inf ({s['variant']})"
        lines.append(
            f"| {s['method']} | {eps} | {s['noise_multiplier']:.2f} | {100 * s['test_accuracy']:.1f}% "
            f"({100 * s['test_accuracy_min']:.1f}-{100 * s['test_accuracy_max']:.1f}) | "
            f"{s['audit_auc']:.3f} ({s['audit_auc_max']:.3f}) | {s['auc_bound']:.3f} |"
        )  # fmt: skip
    return "\n".join(lines)


def plot(summary: list[dict], path) -> None:
    """Test accuracy (mean, min-max bars) and audit AUC against epsilon, one line per method;
    the non-private run as a dashed line."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(dict.fromkeys(s["method"] for s in summary)):
        color = f"C{i}"
        cells = [s for s in summary if s["method"] == method]
        private = [s for s in cells if math.isfinite(s["epsilon"])]
        eps = [s["epsilon"] for s in private]
        acc = np.array([100 * s["test_accuracy"] for s in private])
        err = [acc - [100 * s["test_accuracy_min"] for s in private],
               [100 * s["test_accuracy_max"] for s in private] - acc]  # fmt: skip
        left.errorbar(eps, acc, yerr=err, marker="o", color=color, capsize=3, label=method)
        right.plot(eps, [s["audit_auc"] for s in private], marker="o", color=color, label=f"{method} attack")  # fmt: skip
        for s in cells:
            if not math.isfinite(s["epsilon"]):
                style = "--" if s["variant"] == "no privacy" else ":"
                left.axhline(100 * s["test_accuracy"], color=color, ls=style, lw=1, label=f"{method}, {s['variant']}")  # fmt: skip
    bounds = sorted(
        {(s["epsilon"], s["auc_bound"]) for s in summary if math.isfinite(s["epsilon"])}
    )
    right.plot(*zip(*bounds, strict=True), "k:", label="bound from (epsilon, delta)")
    left.axhline(50, color="grey", lw=0.8, ls=":")
    for ax, label in ((left, "test accuracy (%)"), (right, "membership attack AUC")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "METHODS", "StudyConfig", "StudyData", "balanced_splits", "markdown_table", "plot",
    "prepare", "run_cell", "run_study", "select_step_sizes", "summarise",
]  # fmt: skip
