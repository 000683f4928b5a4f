"""SPSA fine-tuning of the demo's tiny RFA BERT on a SecretFlow PRODUCTION-mode cluster.

``spsa_job`` runs in every party (``launch_parties(cluster, JOB, {...})``), 3 parties, ABY3:

* the model owner's PYU (default ``alice``) creates the weights from its seed and splits
  them into trainable ``theta`` and ``frozen`` (as ``runtime.demo`` does); the data owner's
  PYU (default ``bob``) creates the batch; any further party is a compute party only.
  Weights and batch go to SPU as secret shares straight from their owners' PYUs.
* Only *shapes* are published (each owner reveals its pytree's shapes/dtypes): every
  driver needs them to regenerate the public directions ``z`` and to trace the step.
* Per step, every driver computes ``z = spsa.directions(seed, step, theta_like, K)`` and
  the step size from the schedule in plaintext (identical everywhere, never sent) and
  passes them as plain numpy, which SecretFlow makes PUBLIC SPU inputs. ``theta`` stays an
  SPU object between steps. The step's loss is revealed to the data owner only (its PYU
  writes the losses to a file in its work dir; its driver returns them).
* At the end theta moves to the model owner's PYU only, which writes it (temp + rename)
  to ``<out_dir>/theta-<model_owner>.npz`` (keys: '/'-joined parameter paths). The model
  owner returns the path and the file's sha256; the others return only party and steps.

The step is traced once per driver by :func:`secfwt_jax.compile.simulator.hoist_constants`
(the same hoisting and precision rewrites as ``compile_to_pphlo``): closed-over arrays
(the RFA random features) become explicit PUBLIC arguments of the SPU program, avoiding
spu 0.9.3b0's constant-operand ``dot_general`` miscompile, and the project's default
precision rewrites (``tanh_exp``, ``erf_exp``) and PADE exp are applied, so the cluster
computes the same program as the in-process simulator path.

:func:`plaintext_reference` reruns the same steps in the clear (it needs both the
weights and the data, so only the test/operator process calls it, never a party).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from secfwt_jax.files import write_atomic, write_json_atomic
from secfwt_jax.runtime.cluster import PARTY_WORK_DIR_ENV, ClusterConfig, sf_party_session

__all__ = [
    "JOB",
    "flatten_params",
    "job_config",
    "load_theta",
    "plaintext_reference",
    "spsa_job",
]

JOB = "secfwt_jax.runtime.jobs_spsa:spsa_job"


def job_config(steps: int = 2, seed: int = 0, batch_size: int = 8, seq_len: int = 12):
    """The demo's config for ``steps`` steps (linear schedule over exactly those steps)."""
    from secfwt_jax.runtime.demo import DemoConfig

    base = DemoConfig()
    return dataclasses.replace(
        base,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        seq_len=seq_len,
        schedule=dataclasses.replace(base.schedule, total_steps=max(1, steps)),
    )


def flatten_params(tree: dict) -> dict[str, np.ndarray]:
    """Nested parameter dict -> {'a/b/c': array} (the .npz layout)."""
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def load_theta(path: str | Path) -> dict[str, np.ndarray]:
    """The model owner's saved theta as {'a/b/c': array}."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------ owner-side functions
# These run on one party's PYU (in that party's process only).


def _classifier():
    from secfwt_jax.models.classifier import Classifier
    from secfwt_jax.models.heads import HeadConfig
    from secfwt_jax.runtime.demo import DEMO_MODEL

    return Classifier(DEMO_MODEL, HeadConfig(num_labels=2))


def _owner_init(seed: int):
    """Model owner: fresh weights from its seed, split as in the demo."""
    from secfwt_jax.tuning import trainable

    params = _classifier().init(seed)
    return trainable.partition(params, lambda p: "embeddings" not in p)


def _owner_batch(cfg_dict: dict):
    """Data owner: the demo's synthetic batch."""
    from secfwt_jax.runtime.demo import DEMO_MODEL, synthetic_batch

    return synthetic_batch(_cfg_from_dict(cfg_dict), DEMO_MODEL.vocab_size)


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """Public metadata of a private pytree: {'a/b': (shape, dtype)}; no values."""
    return {k: (tuple(v.shape), v.dtype.str) for k, v in flatten_params(tree).items()}


def _save_theta(theta, path: str) -> str:
    """Model owner: write theta to ``path`` through a temp file and an atomic rename."""
    write_atomic(path, lambda f: np.savez(f, **flatten_params(theta)))
    return path


def _save_losses(path: str, *losses) -> str:
    """Data owner: write the revealed per-step losses (JSON list) atomically."""
    write_json_atomic(path, [float(np.asarray(x)) for x in losses])
    return path


# ------------------------------------------------------------------ helpers


def _cfg_from_dict(d: dict):
    return job_config(d["steps"], d["seed"], d["batch_size"], d["seq_len"])


def _abstract(shapes: dict[str, tuple[tuple[int, ...], str]]):
    import jax
    from flax import traverse_util

    flat = {k: jax.ShapeDtypeStruct(s, np.dtype(d)) for k, (s, d) in shapes.items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _with_preset_runtime(cluster: ClusterConfig):
    """The project's protocol preset for the cluster, and the cluster with its exp mode.

    The preset's exp mode (PADE by default) goes into SPU's runtime config unless the
    cluster config sets one; every party derives the same config from the same input.
    """
    from secfwt_jax.compile import protocols

    preset = protocols.preset(cluster.protocol, cluster.field)
    protocols.check_cluster_allowed(preset)
    extra = {"fxp_exp_mode": f"EXP_{preset.exp_mode}", **cluster.spu_runtime_extra}
    return preset, dataclasses.replace(cluster, spu_runtime_extra=extra)


# ------------------------------------------------------------------ the job


def spsa_job(
    party: str,
    cluster: ClusterConfig,
    steps: int = 2,
    seed: int = 0,
    batch_size: int = 8,
    seq_len: int = 12,
    model_owner: str = "alice",
    data_owner: str = "bob",
    out_dir: str | None = None,
    hoist: bool = True,
    rewrites: bool = True,
) -> dict[str, Any]:
    """One party's side of ``steps`` SPSA steps under SPU (see the module docstring).

    ``hoist=False`` hands the step to SecretFlow as is (constants baked into the bytecode,
    no precision rewrites); ``rewrites=False`` keeps the hoisting but uses SPU's own tanh
    and erf. Both exist only to measure the difference; measured after 2 steps
    (||theta_mpc - theta_plain|| / ||theta_plain||): default 3.6e-5, ``rewrites=False``
    9.7e-5, ``hoist=False`` 4.8e-2 (loss off by 0.045: spu 0.9.3b0's miscompile).
    """
    import jax
    import secretflow as sf
    from secretflow.device.device.spu import SPUCompilerNumReturnsPolicy

    from secfwt_jax.compile.simulator import hoist_constants
    from secfwt_jax.runtime.demo import make_step
    from secfwt_jax.tuning import spsa
    from secfwt_jax.tuning.schedules import make_schedule

    if model_owner == data_owner:
        raise ValueError("model_owner and data_owner must be different parties")
    for who in (model_owner, data_owner):
        if who not in cluster.parties:
            raise ValueError(f"party {who!r} not in cluster parties {list(cluster.parties)}")
    cfg_dict = {"steps": steps, "seed": seed, "batch_size": batch_size, "seq_len": seq_len}
    cfg = _cfg_from_dict(cfg_dict)
    preset, cluster = _with_preset_runtime(cluster)
    out = Path(out_dir or os.environ.get(PARTY_WORK_DIR_ENV) or ".")
    theta_path = str(out / f"theta-{model_owner}.npz")
    loss_path = str(out / f"losses-{data_owner}.json")

    t0 = time.monotonic()
    with sf_party_session(cluster, party, job_name="secfwt-spsa") as spu:
        t_init = time.monotonic() - t0
        mo, do = sf.PYU(model_owner), sf.PYU(data_owner)
        theta_p, frozen_p = mo(_owner_init, num_returns=2)(seed)
        batch_p = do(_owner_batch)(cfg_dict)
        # Public metadata only: shapes and dtypes of the owners' pytrees.
        theta_like, frozen_like, batch_like = (
            _abstract(s) for s in sf.reveal([mo(_shapes)(theta_p), mo(_shapes)(frozen_p),
                                             do(_shapes)(batch_p)])
        )  # fmt: skip

        step = make_step(_classifier(), cfg.spsa)
        k = cfg.spsa.num_directions
        z_like = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), theta_like
        )
        lr_like = jax.ShapeDtypeStruct((), np.float32)
        example = (theta_like, frozen_like, batch_like, z_like, lr_like)
        if hoist:
            program, constants, out_shape = hoist_constants(
                step, example, rewrites=preset.rewrites if rewrites else ()
            )
            out_tree = jax.tree_util.tree_structure(out_shape)

            def spu_step(theta, frozen, batch, z, lr, consts):
                flat = jax.tree_util.tree_leaves((theta, frozen, batch, z, lr))
                return jax.tree_util.tree_unflatten(out_tree, program(*flat, *consts))
        else:
            constants = ()

            def spu_step(theta, frozen, batch, z, lr, consts):
                return step(theta, frozen, batch, z, lr)

        run_step = spu(
            spu_step,
            num_returns_policy=SPUCompilerNumReturnsPolicy.FROM_USER,
            user_specified_num_returns=2,
        )
        schedule = make_schedule(cfg.schedule)
        theta_s = theta_p.to(spu)  # secret shares from the model owner
        frozen_s = frozen_p.to(spu)
        batch_s = batch_p.to(spu)  # secret shares from the data owner
        losses = []
        for i in range(steps):
            z = spsa.directions(seed, i, theta_like, k)  # public, regenerated locally
            lr = np.asarray(schedule(i), np.float32)  # public
            theta_s, loss_s = run_step(theta_s, frozen_s, batch_s, z, lr, constants)
            losses.append(loss_s.to(do))  # revealed to the data owner only
        saved = [
            mo(_save_theta)(theta_s.to(mo), theta_path),  # theta goes to the model owner only
            do(_save_losses)(loss_path, *losses),
        ]
        sf.wait(saved)
        t_compute = time.monotonic() - t0 - t_init

    result: dict[str, Any] = {"party": party, "steps": steps}
    if party == model_owner:
        result.update(theta_path=theta_path, sha256=_sha256(theta_path))
    if party == data_owner:
        result["losses"] = json.loads(Path(loss_path).read_text())
    result.update(init_s=round(t_init, 3), compute_s=round(t_compute, 3))
    return result


# ------------------------------------------------------------------ plaintext reference


def plaintext_reference(
    steps: int = 2, seed: int = 0, batch_size: int = 8, seq_len: int = 12
) -> tuple[dict[str, np.ndarray], list[float]]:
    """The same steps in the clear: (theta as {'a/b': array}, per-step losses).

    Needs the weights AND the data, so it is for the test / operator process only.
    """
    import jax

    from secfwt_jax.runtime.demo import make_step
    from secfwt_jax.tuning import spsa
    from secfwt_jax.tuning.schedules import make_schedule

    cfg_dict = {"steps": steps, "seed": seed, "batch_size": batch_size, "seq_len": seq_len}
    cfg = _cfg_from_dict(cfg_dict)
    theta, frozen = _owner_init(seed)
    batch = _owner_batch(cfg_dict)
    step = jax.jit(make_step(_classifier(), cfg.spsa))
    schedule = make_schedule(cfg.schedule)
    losses = []
    for i in range(steps):
        z = spsa.directions(seed, i, theta, cfg.spsa.num_directions)
        theta, loss = step(theta, frozen, batch, z, np.float32(schedule(i)))
        losses.append(float(loss))
    return flatten_params(theta), losses
