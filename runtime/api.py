"""The Python API: the calls a notebook or script needs, with typed results.

`import secfwt_jax as sf` offers these names (and the pure pieces, `sf.spsa_step` and
friends) without importing SPU or SecretFlow until a call needs them:

    import secfwt_jax as sf

    spec = sf.load_spec("configs/tiny.yaml", overrides=["tuning.steps=2"])
    spec = sf.override(spec, "output.dir=../runs/api")   # any --set the CLI takes
    cost = sf.profile(spec)         # bytes and rounds of every program, before any data
    result = sf.finetune(spec, private_seed=0)             # the in-process SPU simulator
    print(result.accuracy_after, result.total_bytes, result.tuned_params)

A cluster run reads the spec's file at every party, so `finetune` takes the file's path
for it: ``sf.finetune("configs/tiny.yaml", backend="cluster")``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from secfwt_jax.run.spec import RunSpec, apply_overrides, spec_from_dict
from secfwt_jax.run.spec import load_spec as _load_spec


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """What a simulator run reports (every figure is also in `report_path`). Accuracies are
    the MPC predictions on the data owner's evaluation examples; `agreement_after` is the
    share of them that equal the plaintext reference's (None without
    `evaluation.plaintext_reference`). `tuned_params` is the receiver's file (None when the
    result stays as shares)."""

    name: str
    spec_hash: str
    accuracy_before: float | None
    accuracy_after: float | None
    losses: tuple[float, ...] | None
    total_bytes: int | None
    max_rounds: int | None
    seconds: float
    epsilon: float | None
    agreement_after: float | None
    tuned_params: Path | None
    report_path: Path
    out_dir: Path

    @classmethod
    def from_report(cls, report: Mapping[str, Any], out_dir: Path) -> FinetuneResult:
        mpc, cost = report["mpc"], report.get("cost") or {}
        ref, tuned = report.get("plaintext_reference"), report.get("tuned_params")
        losses = mpc.get("losses")
        return cls(
            name=report["spec"]["name"], spec_hash=report["spec_hash"],
            accuracy_before=mpc["accuracy_before"], accuracy_after=mpc["accuracy_after"],
            losses=None if losses is None else tuple(float(x) for x in losses),
            total_bytes=cost.get("total_bytes"), max_rounds=cost.get("max_rounds"),
            seconds=float(report["seconds"]["total"]),
            epsilon=(report.get("privacy") or {}).get("epsilon"),
            agreement_after=ref["agreement_after"] if ref else None,
            tuned_params=Path(tuned["path"]) if tuned else None,
            report_path=Path(report["files"]["report"]), out_dir=Path(out_dir),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ClusterResult:
    """A run on SecretFlow parties: each party's own summary (what it may see)."""

    out_dir: Path
    parties: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    name: str
    key: str
    calls: int
    bytes_per_call: float
    rounds_per_call: float


@dataclasses.dataclass(frozen=True)
class RunCost:
    """A run's MPC cost from its shapes alone (`secfwt compile --profile`): each program's
    bytes and rounds per call and how often the run calls it; the network seconds leave
    compute out."""

    spec_hash: str
    protocol: str
    programs: tuple[ProgramCost, ...]
    total_bytes: float
    total_rounds: float
    network_s: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    name: str
    key: str
    cache_hit: bool
    path: Path | None


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> RunSpec:
    """A run spec from YAML with `key=value` overrides (`SpecError`: one line naming the field)."""
    return _load_spec(path, list(overrides))


def override(spec: RunSpec, *assignments: str) -> RunSpec:
    """`spec` with `key.sub=value` assignments applied and validated again."""
    return spec_from_dict(apply_overrides(spec.to_dict(), assignments), spec.source_dir)


def _cache(spec: RunSpec, cache_dir: str | Path | None) -> Path:
    from secfwt_jax.runtime.cli import cache_dir_for

    return cache_dir_for(spec, cache_dir, "cache_dir")


def finetune(
    spec: RunSpec | str | Path,
    *,
    overrides: Sequence[str] = (),
    backend: str | None = None,
    out_dir: str | Path | None = None,
    private_seed: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> FinetuneResult | ClusterResult:
    """Fine-tune as the spec says, on `backend` ("sim" or "cluster"; default the spec's).

    `private_seed` fixes the model owner's private draws (tests, reproducing a figure;
    as guessable as the seed chosen); without it the model owner draws from the OS."""
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.seeds import check_private_seed

    path = None if isinstance(spec, RunSpec) else Path(spec)
    spec = load_spec(path, overrides) if path is not None else override(spec, *overrides)
    kind = backend or spec.backend.kind
    if kind not in ("sim", "cluster"):
        raise ValueError(f"backend: 'sim' or 'cluster', not {kind!r}")
    seed = None if private_seed is None else check_private_seed(private_seed)
    out = Path(out_dir) if out_dir is not None else None
    if kind == "cluster":
        if path is None:
            raise ValueError("spec: a cluster run needs the spec's file (every party reads it); pass its path")  # fmt: skip
        from secfwt_jax.runtime.cluster_run import launch_local

        parties = launch_local(spec, str(path), list(overrides), seed, out, resume=resume)
        return ClusterResult(Path(out or spec.output_dir), parties)
    from secfwt_jax.runtime.sim_run import finetune_in_simulator

    seeds = None if seed is None else PrivateSeeds(seed)
    report = finetune_in_simulator(spec, seeds=seeds, cache_dir=_cache(spec, cache_dir), out_dir=out, log=log, progress=progress, resume=resume)  # fmt: skip
    return FinetuneResult.from_report(report, Path(out or spec.output_dir))


def compile_programs(
    spec: RunSpec, out: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> list[CompiledProgram]:
    """`secfwt compile`: every program a run of `spec` executes as an SPU artifact (through the cache
    `finetune` uses); with `out`, each also written to `out/<program>/`."""
    from secfwt_jax.compile.spec_programs import compile_run

    target = Path(out) if out is not None else None
    return [
        CompiledProgram(
            a.metadata["name"], a.key, hit, target / a.metadata["name"] if target else None
        )  # fmt: skip
        for a, hit in compile_run(spec, _cache(spec, cache_dir), target)
    ]


def profile(spec: RunSpec, *, cache_dir: str | Path | None = None, log: Callable[[str], None] = lambda _: None) -> RunCost:  # fmt: skip
    """Bytes and rounds of every program of `spec` and of the whole run, measured by
    running each compiled program once in the simulator on zeros (cost depends on shapes
    only)."""
    from secfwt_jax.compile.spec_programs import profile_run

    prof = profile_run(spec, _cache(spec, cache_dir), log=log)
    programs = tuple(
        ProgramCost(r["program"], r["key"], r["calls"], r["bytes_per_call"], r["rounds_per_call"])
        for r in prof["programs"]
    )
    return RunCost(prof["spec_hash"], prof["protocol"], programs, prof["run_total_bytes"],
                   prof["run_total_rounds"], dict(prof["network_s_without_compute"]))  # fmt: skip


__all__ = [
    "ClusterResult", "CompiledProgram", "FinetuneResult", "ProgramCost", "RunCost",
    "compile_programs", "finetune", "load_spec", "override", "profile",
]  # fmt: skip
