"""`secfwt finetune` on SecretFlow parties: the same job as the simulator, one process per party.

    secfwt cluster launch RUN.yaml            all parties as processes on loopback
    secfwt party RUN.yaml --party NAME        one party on its own host (real deployment)

Every party process runs `runtime.finetune.finetune_on` with a `ClusterBackend`: an owner's
function runs in that owner's process only (a SecretFlow PYU), secrets live in the SPU
device, and a value reaches a party's driver only if that party owns it or it was
published as public metadata. The programs are the ones `run.build` makes for every
backend, traced with their closed-over arrays hoisted into public inputs (the same program
and cache key as the simulator). Each party writes `report.json` into its own folder of the
output directory with what it may know; only the receiving party writes the tuned params.

Private seeds: the model owner's seed (fresh head, LoRA factors, an inline model's weights)
is read by the model owner's process only, from `--private-seed` (or a file the launcher
writes for that party alone on loopback); no other party ever holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from secfwt_jax.files import write_text_atomic
from secfwt_jax.run import checkpoints
from secfwt_jax.run.spec import RunSpec, load_spec
from secfwt_jax.runtime.cluster import PARTY_WORK_DIR_ENV, ClusterConfig, load_cluster_config

JOB = "secfwt_jax.runtime.cluster_run:finetune_job"


def handshake_facts(spec: RunSpec) -> dict[str, Any]:
    """What every party must agree on before any secret moves."""
    from secfwt_jax.compile.compiler import versions

    p = spec.protocol
    return {"spec_hash": spec.spec_hash, "protocol": f"{p.name} {p.field} {p.fxp_fraction_bits}",
            "versions": versions()}  # fmt: skip


def handshake_mismatch(facts: dict[str, dict]) -> str | None:
    """One line naming the first fact on which the parties differ, or None."""
    parties = sorted(facts)
    first = facts[parties[0]]
    for party in parties[1:]:
        for key, value in first.items():
            if facts[party].get(key) != value:
                detail = key
                if isinstance(value, dict):
                    diff = sorted(k for k in value if facts[party][key].get(k) != value[k])
                    detail = f"{key} ({', '.join(diff)})"
                return f"handshake: {party} and {parties[0]} differ in {detail}"
    return None


def handshake(spec: RunSpec, party: str, cluster: ClusterConfig, held: list[int]) -> int:
    """Each party publishes its facts and the checkpoint steps it holds from its own PYU;
    every party compares the facts and stops with one line if any differ. Returns the
    resume step: the newest checkpoint every party holds (0 if none)."""
    import secretflow as sf

    mine = {**handshake_facts(spec), "checkpoints": list(held)}
    published = sf.reveal([sf.PYU(p)(lambda facts: facts)(mine) for p in cluster.parties])
    facts = dict(zip(cluster.parties, published, strict=True))
    problem = handshake_mismatch({p: {k: v for k, v in f.items() if k != "checkpoints"} for p, f in facts.items()})  # fmt: skip
    if problem:
        raise ValueError(problem)
    return checkpoints.common_step({p: f["checkpoints"] for p, f in facts.items()})


def _cluster_for(spec: RunSpec, cluster: ClusterConfig) -> ClusterConfig:
    """The cluster with the spec's SPU runtime settings; refuses a cluster that disagrees
    with the spec, including a cluster file's ``spu_runtime_extra`` that sets one of the
    spec's own settings to another value (each party reads its own cluster file, so such a
    key would silently change what that party computes, or how it truncates)."""
    from secfwt_jax.compile import protocols
    from secfwt_jax.compile.protocols import preset_of

    if set(cluster.parties) != set(spec.parties.compute):
        raise ValueError(f"backend.cluster: parties {list(cluster.parties)} differ from parties.compute {list(spec.parties.compute)}")  # fmt: skip
    if (cluster.protocol, cluster.field) != (spec.protocol.name, spec.protocol.field):
        raise ValueError(f"backend.cluster: protocol {cluster.protocol} {cluster.field} differs from the spec's {spec.protocol.name} {spec.protocol.field}")  # fmt: skip
    preset = preset_of(spec)
    protocols.check_cluster_allowed(preset, spec.protocol.allow_insecure_beaver)
    decided = protocols.spec_runtime_settings(preset)
    for key, (value, field) in decided.items():
        given = cluster.spu_runtime_extra.get(key, value)
        if given != value:
            raise ValueError(f"backend.cluster: spu_runtime_extra.{key} is {given!r}, but the spec's {field} makes it {value!r}; set {field} in the spec, not in the cluster file")  # fmt: skip
    extra = {**cluster.spu_runtime_extra, **{key: value for key, (value, _) in decided.items()}}
    allow = cluster.allow_insecure_beaver or spec.protocol.allow_insecure_beaver
    return dataclasses.replace(cluster, spu_runtime_extra=extra, allow_insecure_beaver=allow)


def finetune_as_party(
    spec: RunSpec,
    party: str,
    cluster: ClusterConfig,
    private_seed: int | None,
    out_dir: Path,
    progress: bool = False,
    resume: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """One party's side of the run; writes `<out_dir>/<party>/report.json`. With `resume`
    the parties agree in the handshake on the newest checkpoint all of them hold. The
    compile cache is `cache_dir`, else the spec's `output.cache_dir`, else the user's."""
    from secfwt_jax.compile.protocols import preset_of
    from secfwt_jax.runtime.cli import cache_dir_for
    from secfwt_jax.runtime.cluster import sf_party_session
    from secfwt_jax.runtime.finetune import PrivateSeeds, finetune_on, model_owner_seed
    from secfwt_jax.runtime.report import check_output_dir, write_report

    if party not in spec.parties.compute:
        raise ValueError(f"--party: {party!r} is not a compute party {list(spec.parties.compute)}")
    check_output_dir(out_dir)
    cache_dir = cache_dir_for(spec, cache_dir, "--cache-dir")
    cluster = _cluster_for(spec, cluster)
    if party == spec.parties.model_owner and private_seed is None:
        private_seed = model_owner_seed(out_dir, party, resume)  # drawn here, by its owner
    seeds = PrivateSeeds(model_owner=private_seed if party == spec.parties.model_owner else -1)
    log = lambda m: print(f"[{party}] {m}", flush=True)  # noqa: E731
    with sf_party_session(cluster, party, job_name="secfwt-finetune", open_spu=False) as spu:
        held = checkpoints.held_steps(out_dir, party, spec.spec_hash, "cluster", log=log) if resume else []  # fmt: skip
        agreed = handshake(spec, party, cluster, held)  # before any secret moves
        if resume and not agreed:
            log(f"--resume: no checkpoint of spec {spec.spec_hash[:12]} held by every party; starting afresh")  # fmt: skip
        from secfwt_jax.runtime.cluster_backend import ClusterBackend

        backend = ClusterBackend(spu, party, preset_of(spec), cluster, log, cache_dir)
        report = finetune_on(spec, backend, seeds, out_dir=out_dir, progress=progress, log=log, resume_step=agreed).report  # fmt: skip
    report["files"] = write_report(report, out_dir / party)
    return report


def finetune_job(
    party: str,
    cluster: ClusterConfig,
    spec_path: str,
    overrides: list[str],
    out_dir: str,
    private_seed_dir: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """The launcher's per-party entry (`party_main`): finetune_as_party, return a short summary."""
    spec = load_spec(spec_path, overrides)
    seed = None
    seed_file = Path(private_seed_dir or os.environ.get(PARTY_WORK_DIR_ENV, ".")) / f"{party}.private_seed"  # fmt: skip
    if seed_file.is_file():  # written for the model owner alone
        seed = int(seed_file.read_text())
    report = finetune_as_party(spec, party, cluster, seed, Path(out_dir), resume=resume)
    mpc = report["mpc"]
    return {
        "party": party,
        "spec_hash": report["spec_hash"],
        "programs": {k: v["key"] for k, v in report["programs"].items()},
        "accuracy_before": mpc["accuracy_before"],
        "accuracy_after": mpc["accuracy_after"],
        "losses": mpc["losses"],
        "tuned_params": report.get("tuned_params"),
        "resumed_from_step": report["resumed_from_step"],
        "privacy": report.get("privacy"),
        "report": report["files"]["report"],
    }


def launch_local(
    spec: RunSpec,
    spec_path: str,
    overrides: list[str],
    private_seed: int | None,
    out_dir: Path | None = None,
    timeout_s: float | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    started: list | None = None,
    link=None,
    relays: list | None = None,
) -> dict[str, Any]:
    """All compute parties as processes on this host (loopback unless the spec's cluster
    file says otherwise); returns each party's summary. With `link` (a
    `runtime.link_shaper` profile or its name), every party reaches every peer's
    SecretFlow and SPU ports through a shaped relay of that profile, each direction of
    each pair its own link."""
    import tempfile

    from secfwt_jax.runtime.cluster import loopback_cluster
    from secfwt_jax.runtime.launcher import launch_parties

    out_dir = Path(out_dir or spec.output_dir)
    if spec.backend.cluster:
        cluster = load_cluster_config(spec.resolve(spec.backend.cluster))
    else:
        cluster = loopback_cluster(spec.parties.compute, spec.protocol.name, spec.protocol.field)
    _cluster_for(spec, cluster)  # refuse a bad cluster before any process starts
    wd = Path(work_dir or tempfile.mkdtemp(prefix="secfwt-cluster-"))
    wd.mkdir(parents=True, exist_ok=True)
    seed_file = wd / f"{spec.parties.model_owner}.private_seed"
    if private_seed is not None:  # given (tests, reproducing a figure); else drawn at the party
        write_text_atomic(seed_file, str(private_seed), private=True)
    args = {"spec_path": str(Path(spec_path).resolve()), "overrides": list(overrides), "out_dir": str(out_dir.resolve()), "resume": resume}  # fmt: skip
    with contextlib.ExitStack() as stack:
        if link is not None:
            cluster = _through_relays(cluster, link, stack, relays)
        try:
            return launch_parties(cluster, JOB, args, timeout_s=timeout_s or spec.backend.timeout_s,
                                  work_dir=wd, keep_work_dir=True, started=started)  # fmt: skip
        finally:
            seed_file.unlink(missing_ok=True)


def _through_relays(cluster: ClusterConfig, link, stack: contextlib.ExitStack, relays: list | None) -> ClusterConfig:  # fmt: skip
    """`cluster` with every party dialling every peer through a relay of `link`."""
    from secfwt_jax.runtime.link_shaper import LinkShaper

    pairs = [(a, b) for a in cluster.parties for b in cluster.parties if a != b]
    targets = {f"{kind} {a}->{b}": (cluster.host, ports[b]) for kind, ports in (("sf", cluster.sf_ports), ("spu", cluster.spu_ports)) for a, b in pairs}  # fmt: skip
    shaper = stack.enter_context(LinkShaper(targets, link, host=cluster.host))
    if relays is not None:
        relays.append(shaper)
    dial = {kind: {a: {b: shaper.port(f"{kind} {a}->{b}") for b in cluster.parties if b != a} for a in cluster.parties} for kind in ("sf", "spu")}  # fmt: skip
    return dataclasses.replace(cluster, sf_dial=dial["sf"], spu_dial=dial["spu"])


def load_theta(path: str | Path) -> dict[str, np.ndarray]:
    """A party's tuned parameters as {'a/b/c': array}."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def summary_json(results: dict[str, Any]) -> str:
    return "\n".join(f"{party}: {json.dumps(r)}" for party, r in results.items())


__all__ = ["JOB", "finetune_job", "launch_local", "load_theta", "finetune_as_party"]
