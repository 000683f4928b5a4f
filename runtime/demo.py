"""The walking skeleton: a few SPSA steps of a tiny RFA BERT classifier, compiled by SPU.

Every layer of the pipeline is real:
  * model: a BERT-shaped Flax classifier with random feature attention (bounded polynomial
    sin/cos), randomly initialised from a config;
  * step: the jitted forward-only SPSA step (`secfwt_jax.tuning.spsa.spsa_step`), z drawn
    on the host from a public seed, step size from an optax schedule;
  * MPC: the step compiled once to SPU bytecode and run in a persistent in-process SPU
    session (`SimulatorSession`); model weights, data and labels are secret inputs; z and
    the step size are public inputs. The trainable parameters stay secret-shared between
    steps: only each step's loss (opt-in) and the final parameters are revealed;
  * check: the same steps in plaintext with the same seeds, and the parameter gap
    (max abs, and relative: ||theta_mpc - theta_plain|| / ||theta_plain||).

The task is synthetic and fixed by the seed (label = whether token 5 occurs in the text):
this run exercises the data flow, not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from secfwt_jax.compile import protocols
from secfwt_jax.compile.session import SimulatorSession
from secfwt_jax.compile.simulator import compile_to_pphlo
from secfwt_jax.models.classifier import Classifier, cross_entropy
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import spsa, trainable
from secfwt_jax.tuning.schedules import ScheduleConfig, make_schedule

DEMO_MODEL = ModelConfig(
    family="bert",
    vocab_size=64,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_positions=32,
    type_vocab_size=2,
    activation="gelu_new",
    attention=AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32),
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    protocol: str = "ABY3"
    field: str = "FM64"
    steps: int = 3
    batch_size: int = 8
    seq_len: int = 12
    seed: int = 0
    spsa: spsa.SpsaConfig = spsa.SpsaConfig(eps=1e-2)
    schedule: ScheduleConfig = ScheduleConfig(kind="linear", peak=5e-3, total_steps=3)


def synthetic_batch(cfg: DemoConfig, vocab: int) -> dict:
    """One-hot token batch (the MPC input form) with right padding and one-hot labels."""
    rng = np.random.default_rng([cfg.seed, 1])
    ids = rng.integers(6, vocab, (cfg.batch_size, cfg.seq_len))
    ids[::2, rng.integers(1, cfg.seq_len)] = 5
    lengths = rng.integers(cfg.seq_len // 2, cfg.seq_len + 1, cfg.batch_size)
    mask = (np.arange(cfg.seq_len)[None] < lengths[:, None]).astype(np.float32)
    labels = ((ids == 5) * mask).any(axis=1).astype(np.int32)
    eye = np.eye(vocab, dtype=np.float32)
    return {
        "input_ids": eye[ids] * mask[..., None],
        "attention_mask": mask,
        "labels": np.eye(2, dtype=np.float32)[labels],
    }


def make_step(classifier: Classifier, config: spsa.SpsaConfig):
    def loss_fn(t, f, batch):
        return cross_entropy(classifier.logits(trainable.merge(t, f), batch), batch["labels"])

    def step(t, f, batch, z, step_size):
        # Only the new (secret) parameters and the batch loss leave the step: the projected
        # gradients and the perturbed losses stay inside the program.
        new_t, info = spsa.spsa_step(loss_fn, t, f, batch, z, step_size, config)
        return new_t, info["loss"]

    return step


def max_abs_gap(a, b) -> float:
    gaps = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
    return max(jax.tree_util.tree_leaves(gaps))


def relative_gap(a, b) -> float:
    """||a - b|| / ||b|| over all leaves (the project's "relative" parameter error)."""
    num = sum(
        float(np.sum((x - y) ** 2))
        for x, y in zip(*map(jax.tree_util.tree_leaves, (a, b)), strict=False)
    )
    den = sum(float(np.sum(y**2)) for y in jax.tree_util.tree_leaves(b))
    return float(np.sqrt(num / den))


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    """Run `cfg.steps` SPSA steps under MPC and in plaintext; return the summary dict."""
    cfg = cfg or DemoConfig()
    preset = protocols.preset(cfg.protocol, cfg.field)
    classifier = Classifier(DEMO_MODEL, HeadConfig(num_labels=2))
    params = classifier.init(cfg.seed)
    # Train everything but the embeddings (all weights stay secret; only the split differs).
    theta, frozen = trainable.partition(params, lambda p: "embeddings" not in p)
    batch = synthetic_batch(cfg, DEMO_MODEL.vocab_size)
    schedule = make_schedule(cfg.schedule)
    step = make_step(classifier, cfg.spsa)
    plain_step = jax.jit(step)

    z0 = spsa.directions(cfg.seed, 0, theta, cfg.spsa.num_directions)
    compiled = compile_to_pphlo(
        step, (theta, frozen, batch, z0, np.float32(0)), public={3, 4}, name="spsa_step",
        rewrites=preset.rewrites,
    )  # fmt: skip
    session = SimulatorSession(preset, profile=True)
    session.put("theta", theta)  # model owner's weights: secret
    session.put("frozen", frozen)
    session.put("batch", batch)  # data owner's data and labels: secret
    plain_theta = theta
    mpc_losses, plain_losses, step_cost, wall = [], [], None, []
    for i in range(cfg.steps):
        z = spsa.directions(cfg.seed, i, theta, cfg.spsa.num_directions)  # public
        lr = np.float32(schedule(i))  # public
        session.put("z", z, public=True)
        session.put("lr", lr, public=True)
        start = time.perf_counter()
        cost = session.run(compiled, ["theta", "frozen", "batch", "z", "lr"], ["theta", "loss"])
        wall.append(time.perf_counter() - start)
        step_cost = step_cost or cost
        mpc_losses.append(float(session.reveal("loss")))  # the data owner's opt-in per step
        plain_theta, plain_loss = plain_step(plain_theta, frozen, batch, z, lr)
        plain_losses.append(float(plain_loss))
        log(
            f"step {i}: lr={lr:.2e} loss mpc={mpc_losses[-1]:.5f} "
            f"plain={plain_losses[-1]:.5f}  ({wall[-1]:.1f} s)"
        )
    mpc_theta = session.reveal("theta")  # the tuned result, revealed once

    summary = {
        "protocol": preset.name,
        "field": preset.field,
        "parties": preset.world_size,
        "steps": cfg.steps,
        "trainable_parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(theta))),
        "losses_mpc": mpc_losses,
        "losses_plaintext": plain_losses,
        "max_param_gap_mpc_vs_plaintext": max_abs_gap(mpc_theta, plain_theta),
        "relative_param_gap_mpc_vs_plaintext": relative_gap(mpc_theta, plain_theta),
        "max_loss_gap_mpc_vs_plaintext": float(
            np.max(np.abs(np.subtract(mpc_losses, plain_losses)))
        ),
        "param_change_plaintext": max_abs_gap(plain_theta, theta),
        "relative_param_change_plaintext": relative_gap(plain_theta, theta),
        "step_cost": {
            "total_bytes": step_cost.total_bytes,
            "per_party_bytes": step_cost.per_party_bytes,
            "max_rounds": step_cost.max_rounds,
            "per_party_rounds": step_cost.per_party_rounds,
        },
        "median_step_seconds": float(np.median(wall)),
    }
    log(json.dumps(summary, indent=2))
    return summary
