"""Which function to compile: a `CompileConfig` -> a `CompileJob` with example arguments.

Four functions, each with the roles of the visibility policy (secret: weights, trainable
parameters, data, labels; public: step sizes, directions, hoisted constants):

  spsa_step      (trainable, frozen, batch, z [K, ...], step_size) -> (trainable, info)
                 `spsa.spsa_step` with the config's eps / num_directions.
  cma_forward    (population {'z': [P, d]}, frozen, batch) -> losses [P]
                 `spsa.evaluate_population` over CMA-ES candidates of the 'prompt' set.
                 The candidates are public by design (the data owner samples them in
                 plaintext); they carry the role "directions".
  backprop_step  (trainable, frozen, batch, step_size) -> (trainable, {loss})
                 `backprop.backprop_step` with `optax.sgd(step_size)` (its state is empty,
                 so it is neither an input nor an output).
  forward        (trainable, frozen, batch) -> logits [B, C]  (`Classifier.logits`
                 through the trainable set's merge, e.g. the soft prompt).

Arguments are zero arrays of the configured shapes (no data is read): input_ids one-hot
float [B, N, V] (the MPC form), attention_mask float [B, N], labels one-hot float [B, C],
select one-hot float [B, N] for mlm/lm heads. The model parameters are real: a checkpoint's
weights, or an inline model initialised from `seed`, because some trace constants (the
prompt projection's scale) depend on them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import numpy as np
import optax

from secfwt_jax.models import checkpoint
from secfwt_jax.models.classifier import Classifier, cross_entropy
from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.feature_maps import random_directions
from secfwt_jax.tuning import spsa
from secfwt_jax.tuning.backprop import backprop_step
from secfwt_jax.tuning.sets import TuningProblem, build_problem, prompt_projection

from .artifacts import CompileJob
from .job_config import CompileConfig


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint directory's config.json and weight files (names + bytes)."""
    directory = Path(path)
    h = hashlib.sha256()
    names = ("config.json", checkpoint.FLAX_WEIGHTS, checkpoint.SAFETENSORS_WEIGHTS, checkpoint.TORCH_WEIGHTS)  # fmt: skip
    for name in names:
        file = directory / name
        if file.is_file():
            h.update(name.encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def build_model(cfg: CompileConfig) -> tuple[Classifier, dict]:
    """(classifier, numpy params) from the checkpoint or the inline architecture."""
    m = cfg.model
    if m.checkpoint is not None:
        try:
            return checkpoint.load_pretrained(m.checkpoint, cfg.attention, cfg.head, seed=cfg.seed)
        except checkpoint.CheckpointError as error:
            raise ValueError(f"compile.model.checkpoint: {error}") from None
    if cfg.head.kind == "mlm":
        raise ValueError("compile.head.kind: 'mlm' needs a checkpoint (an inline model has no MLM head weights)")  # fmt: skip
    config = ModelConfig(
        family=m.family, vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        num_layers=m.num_layers, num_heads=m.num_heads, intermediate_size=m.intermediate_size,
        max_positions=m.max_positions, type_vocab_size=m.type_vocab_size,
        layer_norm_eps=m.layer_norm_eps, activation=m.activation, attention=cfg.attention,
    )  # fmt: skip
    try:
        classifier = Classifier(config, cfg.head)
    except ValueError as error:
        raise ValueError(f"compile.{error}") from None
    return classifier, classifier.init(cfg.seed)


def example_batch(cfg: CompileConfig, classifier: Classifier) -> dict:
    """Zero arrays shaped like one MPC batch (see module doc)."""
    b, n = cfg.batch_size, cfg.seq_len
    batch = {
        "input_ids": np.zeros((b, n, classifier.config.vocab_size), np.float32),
        "attention_mask": np.ones((b, n), np.float32),  # ones: the trunk cache stays finite
        "labels": np.zeros((b, cfg.head.num_labels), np.float32),
    }
    if cfg.head.kind != "linear":
        batch["select"] = np.zeros((b, n), np.float32)
    return batch


def _check_positions(cfg: CompileConfig, classifier: Classifier) -> None:
    prompt = cfg.trainable.prompt_length if cfg.trainable.kind == "prompt" else 0
    limit = classifier.config.max_positions
    if cfg.seq_len + prompt > limit:
        extra = f" + prompt_length {prompt}" if prompt else ""
        raise ValueError(f"compile.seq_len: {cfg.seq_len}{extra} exceeds the model's max_positions {limit}")  # fmt: skip


def _batch_role(path: str) -> str:
    return "labels" if path.split("/")[0] == "labels" else "data"


def _description(cfg: CompileConfig) -> dict:
    """The config facts that fix the program (protocol and shapes are keyed separately)."""
    d = cfg.to_dict()
    d.pop("protocol")
    if cfg.model.checkpoint is not None:  # the content, not the path, fixes the program
        d["model"] = {"checkpoint_sha256": checkpoint_fingerprint(cfg.model.checkpoint)}
    if cfg.function != "spsa_step":
        d.pop("spsa")
    if cfg.function == "cma_forward":
        d["cma"] = {"population": cfg.cma.population}
    else:
        d.pop("cma")
    return d


def _functions(cfg: CompileConfig, problem: TuningProblem, batch: dict) -> dict:
    """name -> (fn, args, arg_names, roles)."""

    def loss_fn(t, f, b):  # as tuning.loop.problem_loss
        return cross_entropy(problem.logits(t, f, b), b["labels"])

    theta, frozen = problem.trainable, problem.frozen
    step_size = np.float32(0)

    def spsa_step(t, f, b, z, lr):
        return spsa.spsa_step(loss_fn, t, f, b, z, lr, cfg.spsa)

    def cma_forward(population, f, b):
        return spsa.evaluate_population(loss_fn, population, f, b)

    def sgd_backprop_step(t, f, b, lr):
        optimizer = optax.sgd(lr)
        new_t, _, info = backprop_step(loss_fn, optimizer, t, f, b, optimizer.init(t))
        return new_t, info

    def forward(t, f, b):
        return problem.logits(t, f, b)

    z = jax.tree_util.tree_map(lambda x: np.zeros((cfg.spsa.num_directions, *np.shape(x)), np.float32), theta)  # fmt: skip
    population = jax.tree_util.tree_map(lambda x: np.zeros((cfg.cma.population, *np.shape(x)), np.float32), theta)  # fmt: skip
    forward_batch = {k: v for k, v in batch.items() if k != "labels"}  # logits never read labels
    return {
        "spsa_step": (spsa_step, (theta, frozen, batch, z, step_size),
                      ("trainable", "frozen", "batch", "z", "step_size"),
                      ("trainable", "weights", _batch_role, "directions", "step_size")),
        "cma_forward": (cma_forward, (population, frozen, batch),
                        ("population", "frozen", "batch"),
                        ("directions", "weights", _batch_role)),
        "backprop_step": (sgd_backprop_step, (theta, frozen, batch, step_size),
                          ("trainable", "frozen", "batch", "step_size"),
                          ("trainable", "weights", _batch_role, "step_size")),
        "forward": (forward, (theta, frozen, forward_batch),
                    ("trainable", "frozen", "batch"),
                    ("trainable", "weights", _batch_role)),
    }  # fmt: skip


def build_job(cfg: CompileConfig) -> CompileJob:
    """The `CompileJob` for ``cfg.function`` (builds the model; compiles nothing)."""
    classifier, params = build_model(cfg)
    _check_positions(cfg, classifier)
    problem = build_problem(cfg.trainable, classifier, params, seed=cfg.seed)
    batch = jax.tree_util.tree_map(np.asarray, problem.prepare(example_batch(cfg, classifier)))
    fn, args, names, roles = _functions(cfg, problem, batch)[cfg.function]
    known = _known_constants(cfg, classifier, params)
    return CompileJob(cfg.function, fn, args, names, roles, _description(cfg), known)


def _known_constants(cfg: CompileConfig, classifier: Classifier, params: dict) -> dict:
    """Public arrays the program closes over: RFA directions per layer, prompt projection A
    (recomputed exactly as the model and `build_problem` do)."""
    c = classifier.config
    known = {}
    if c.attention.kind == "rfa":
        a = c.attention
        for layer in range(c.num_layers):
            w = random_directions(a.seed, layer, c.num_heads, c.head_dim, a.num_features, a.sigma)
            known[f"attention/layer/{layer}/directions"] = ("features", w)
    if cfg.trainable.kind == "prompt":
        std = float(np.asarray(classifier.word_table(params)).std())
        known["prompt/projection"] = ("projection", prompt_projection(cfg.trainable, c.hidden_size, std))  # fmt: skip
    return known
