"""`secfwt compile RUN.yaml --out DIR`: the run's SPU programs as artifacts, ahead of a run.

The programs come from the one builder (`secfwt_jax.run.build.build_programs`), from
public facts only: the architecture and shapes (the checkpoint's config and weights are
read for shapes and, for a prompt set, the embedding std that scales the projection) and
the chunk shapes the spec and the public tokenizer fix (no data file is read). They land
in the same disk cache, under the same keys, that `secfwt finetune` then hits.
"""

from __future__ import annotations

from pathlib import Path

from secfwt_jax.models.checkpoint import load_tokenizer
from secfwt_jax.run import build
from secfwt_jax.run.spec import RunSpec

from . import protocols
from .artifacts import Artifact, compile_cached, compile_job, write_artifact
from .sim_backend import job_of


def preset_of(spec: RunSpec) -> protocols.ProtocolPreset:
    """The SPU preset a run spec names."""
    p = spec.protocol
    return protocols.preset(p.name, p.field, fxp_fraction_bits=p.fxp_fraction_bits,
                            exp_mode=p.exp_mode, beaver_type=p.beaver_type)  # fmt: skip


def run_programs(spec: RunSpec, private_seed: int = 0) -> build.RunPrograms:
    """The run's programs as the model owner would build them before any data arrives."""
    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    head = build.head_config(spec, tokenizer)
    _, _, public = build.model_owner_inputs(spec, head, private_seed, log=lambda m: None)
    data_public = build.public_data_shapes(spec, tokenizer, public.model_config["vocab_size"])
    return build.build_programs(spec, public, head, data_public)


def compile_run(
    spec: RunSpec, cache_dir: str | Path | None, out: Path | None = None
) -> list[tuple[Artifact, bool]]:
    """Compile (or fetch from the cache) every program a run of `spec` executes; with
    `out`, also write each as `out/<program>/`. Returns (artifact, cache hit) per program."""
    preset = preset_of(spec)
    results = []
    for program in run_programs(spec).needed(spec.tuning.method):
        job = job_of(program)
        if cache_dir is None:
            artifact, hit = compile_job(job, preset), False
        else:
            artifact, hit = compile_cached(job, preset, cache_dir)
        if out is not None:
            write_artifact(artifact, out / program.name)
        results.append((artifact, hit))
    return results


__all__ = ["compile_run", "preset_of", "run_programs"]
