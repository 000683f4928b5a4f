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

from .artifacts import compile_cached, write_artifact
from .compiler import Artifact
from .protocols import preset_of, share_bytes


def public_facts(spec: RunSpec, private_seed: int = 0) -> tuple[build.ModelPublic, object, dict]:
    """What the owners publish before a run (the model's shapes, the head, the data's
    chunk shapes), derived here from the spec, the checkpoint and the public tokenizer."""
    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    head = build.head_config(spec, tokenizer)
    _, _, public = build.model_owner_inputs(spec, head, private_seed, log=lambda m: None)
    data_public = build.public_data_shapes(spec, tokenizer, public.model_config["vocab_size"])
    return public, head, data_public


def programs_of_run(spec: RunSpec, private_seed: int = 0) -> build.RunPrograms:
    """The run's programs as the model owner would build them before any data arrives."""
    public, head, data_public = public_facts(spec, private_seed)
    return build.build_programs(spec, public, head, data_public)


def input_share_bytes(spec: RunSpec, facts: tuple | None = None) -> int:
    """The bytes of the owners' shares that reach one compute party in a run (the
    trainable and frozen parameters and every data chunk: `build.shared_input_elements`).
    They cross the SecretFlow links before the programs run, all at once; the programs'
    profile does not count them. `facts`: `public_facts(spec)` if the caller has them."""
    public, _, data_public = facts or public_facts(spec)
    p = spec.protocol
    return share_bytes(p.name, p.field, build.shared_input_elements(public, data_public))


def compile_run(
    spec: RunSpec, cache_dir: str | Path | None, out: Path | None = None
) -> list[tuple[Artifact, bool]]:
    """Compile (or fetch from the cache) every program a run of `spec` executes; with
    `out`, also write each as `out/<program>/`. Returns (artifact, cache hit) per program."""
    preset = preset_of(spec)
    results = []
    for program in programs_of_run(spec).needed(spec.tuning.method):
        artifact, hit = compile_cached(program, preset, cache_dir)
        if out is not None:
            write_artifact(artifact, out / program.name)
        results.append((artifact, hit))
    return results


def run_calls(spec: RunSpec, programs: list[build.ProgramDef]) -> dict[str, int]:
    """How often a fresh (not resumed) run of `spec` executes each program: the trunk once
    per training chunk (and per evaluation chunk, unless `trunk_eval` has their shape),
    predict before and after tuning on every evaluation chunk, the step (or one CMA-ES
    population) per step."""
    train_chunks = spec.data.k * len(spec.data.labels) // spec.tuning.batch_size
    eval_chunks = -(-spec.evaluation.mpc_examples // spec.evaluation.batch_size)
    names = {p.name for p in programs}
    calls = {
        "trunk": train_chunks + (0 if "trunk_eval" in names else eval_chunks),
        "trunk_eval": eval_chunks,
        "predict": 2 * eval_chunks,
        "spsa_step": spec.tuning.steps,
        "dp_spsa_step": spec.tuning.steps,
        "population_loss": spec.tuning.steps,
    }
    return {name: calls[name] for name in names}


def profile_run(spec: RunSpec, cache_dir: str | Path | None, log=print) -> dict:
    """Bytes and rounds of every program a run of `spec` executes, measured by running its
    compiled artifact (the one `secfwt finetune` runs, through the same cache) once in the
    simulator on zeros of the public shapes, and the whole run's cost from the call
    counts. MPC cost depends on shapes only, so this is the run's cost before any data
    exists. The network estimate (`network_s_without_compute`, per party) adds the owners'
    shares (`input_share_bytes`) to the programs' bytes; a SecretFlow cluster run (whose
    link statistics spu 0.9.3 does not expose) executes the same bytecode."""
    from . import network
    from .profiler import profile_artifact

    preset = preset_of(spec)
    facts = public_facts(spec)  # once: the model owner's inputs are built to derive them
    programs = build.build_programs(spec, *facts).needed(spec.tuning.method)
    calls = run_calls(spec, programs)
    rows = []
    for program in programs:
        artifact, _ = compile_cached(program, preset, cache_dir)
        prof = profile_artifact(artifact, program.args, preset)
        top = sorted(prof.per_op.items(), key=lambda kv: -kv[1].bytes)[:5]
        row = {"program": program.name, "key": artifact.key, "calls": calls[program.name],
               "bytes_per_call": prof.total_bytes, "rounds_per_call": prof.rounds,
               "top_ops_bytes": {op: c.bytes for op, c in top}}  # fmt: skip
        rows.append(row)
        log(f"  {program.name}: {prof.total_bytes / 1e6:,.1f} MB, {prof.rounds:,.0f} rounds per call "
            f"x {row['calls']} calls")  # fmt: skip
    total_bytes = sum(r["bytes_per_call"] * r["calls"] for r in rows)
    total_rounds = sum(r["rounds_per_call"] * r["calls"] for r in rows)
    inputs = input_share_bytes(spec, facts)
    nets = {name: net.estimate(total_bytes / preset.world_size + inputs, total_rounds) for name, net in network.PRESETS.items()}  # fmt: skip
    return {"spec_hash": spec.spec_hash, "protocol": preset.name, "world_size": preset.world_size,
            "programs": rows, "run_total_bytes": total_bytes, "run_total_rounds": total_rounds,
            "input_share_bytes_per_party": inputs, "network_s_without_compute": nets}  # fmt: skip


__all__ = ["compile_run", "profile_run", "run_calls", "programs_of_run"]
