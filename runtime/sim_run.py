"""`secfwt finetune` on the embedded backend: the in-process SPU simulator.

One process plays every party (the backend still enforces who may read what), so it can
also run the plaintext reference on request and compare: predictions agreement, the loss
gap and the parameter gap between the MPC run and plaintext with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from secfwt_jax.compile.protocols import preset_of
from secfwt_jax.run import build, checkpoints
from secfwt_jax.run.reference import agreement, plaintext_reference, relative_gap
from secfwt_jax.run.spec import RunSpec
from secfwt_jax.runtime.finetune import PrivateSeeds, finetune_on, model_owner_seed
from secfwt_jax.runtime.report import check_output_dir, write_report
from secfwt_jax.runtime.sim_backend import SimBackend


def finetune_in_simulator(
    spec: RunSpec,
    *,
    seeds: PrivateSeeds | None = None,
    cache_dir: str | Path | None = None,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run `spec` on the simulator; write report.json, curves.png and the tuned params.
    `resume` restarts from the newest checkpoint every party holds (afresh if none).
    Without `seeds` the model owner draws its seed from the OS (`model_owner_seed`)."""
    out_dir = Path(out_dir or spec.output_dir)
    check_output_dir(out_dir)
    if seeds is None:
        seeds = PrivateSeeds(model_owner_seed(out_dir, spec.parties.model_owner, resume))
    preset = preset_of(spec)
    log(f"run {spec.name} ({spec.spec_hash[:12]}): {spec.tuning.method} on {preset.name} {preset.field}, simulator with {preset.world_size} parties")  # fmt: skip
    step = resume_step(spec, out_dir, "sim", spec.parties.compute, log) if resume else 0
    backend = SimBackend(preset, cache_dir=cache_dir)
    done = finetune_on(spec, backend, seeds, out_dir=out_dir, log=log, progress=progress, resume_step=step)  # fmt: skip
    report, owners = done.report, done.owners
    if spec.evaluation.plaintext_reference:
        log("operator: plaintext reference (reads both owners' secrets; simulator only)")
        head, tokenizer = owners.head.value
        dp_seed = owners.dp_seed and owners.dp_seed.value
        ref = plaintext_reference(spec, done.programs, owners.theta.value, owners.frozen.value, owners.data.value, tokenizer, dp_seed)  # fmt: skip
        mpc = report["mpc"]
        summary = {k: ref[k] for k in ("before", "after", "losses", "relative_param_change")}
        summary["agreement_before"] = agreement(mpc["predictions_before"], ref["before"]["predictions"])  # fmt: skip
        summary["agreement_after"] = agreement(mpc["predictions_after"], ref["after"]["predictions"])  # fmt: skip
        if mpc.get("losses") and ref["losses"]:
            summary["max_loss_gap"] = float(np.max(np.abs(np.subtract(mpc["losses"], ref["losses"]))))  # fmt: skip
        tuned = report.get("tuned_params")
        if tuned:
            with np.load(tuned["path"]) as f:
                tuned_theta = dict(f)
            final, initial = build.flatten(ref["theta"]), build.flatten(owners.theta.value)
            summary["relative_param_gap"] = relative_gap(tuned_theta, final)
            # The gap against the plaintext run's own update: scale-free, and the strict
            # measure where tuning starts from zeros (BitFit biases, LoRA's B).
            summary["relative_update_gap"] = relative_gap(tuned_theta, final, initial)
        report["plaintext_reference"] = summary
    report["files"] = write_report(report, out_dir)
    return report


def resume_step(spec: RunSpec, out_dir: Path, backend: str, parties, log: Callable[[str], None]) -> int:  # fmt: skip
    """The newest step every party holds a checkpoint of (0: none; the log says why)."""
    held = {p: checkpoints.held_steps(out_dir, p, spec.spec_hash, backend, log=log) for p in parties}  # fmt: skip
    step = checkpoints.common_step(held)
    if not step:
        log(f"--resume: no checkpoint of spec {spec.spec_hash[:12]} ({backend}) held by every party in {out_dir}; starting afresh")  # fmt: skip
    return step


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The lines `secfwt finetune` prints at the end."""
    mpc, ref = report["mpc"], report.get("plaintext_reference")
    lines = [f"run {report['spec']['name']}  spec {report['spec_hash'][:12]}"]
    if mpc["accuracy_before"] is not None:
        lines.append(f"  MPC test accuracy ({report['counts']['mpc_eval']} examples): before {100 * mpc['accuracy_before']:.1f}%  after {100 * mpc['accuracy_after']:.1f}%")  # fmt: skip
    if ref:
        lines.append(f"  plaintext, same examples:            before {100 * ref['before']['accuracy']:.1f}%  after {100 * ref['after']['accuracy']:.1f}%  (MPC/plaintext agree on {100 * ref['agreement_before']:.1f}% / {100 * ref['agreement_after']:.1f}%)")  # fmt: skip
        lines.append(f"  plaintext, full test split ({report['counts']['test']}):     before {100 * ref['before']['full_test_accuracy']:.1f}%  after {100 * ref['after']['full_test_accuracy']:.1f}%")  # fmt: skip
        if "relative_param_gap" in ref:
            lines.append(f"  tuned parameters, MPC vs plaintext: relative gap {ref['relative_param_gap']:.2e} ({ref['relative_update_gap']:.2e} of the update)")  # fmt: skip
    cost = report.get("cost")
    if cost:
        lines.append(f"  communication: {cost['total_bytes'] / 1e9:.2f} GB over all parties, {cost['max_rounds']:,} rounds")  # fmt: skip
    lines.append(f"  time: {report['seconds']}")
    for name, path in report["files"].items():
        lines.append(f"  {name}: {path}")
    if report.get("tuned_params"):
        lines.append(f"  tuned parameters (only at {report['tuned_params']['party']}): {report['tuned_params']['path']}")  # fmt: skip
    return lines
