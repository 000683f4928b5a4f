"""Where the main run's frozen trunk spends its time: SPU's per-op wall time, by MPC kernel.

    .venv/bin/python benchmarks/trunk_profile.py [RUN.yaml] [--set KEY=VALUE ...] [--out FILE]

The trunk is the program `secfwt finetune` runs once per chunk of training examples (92% of
the main run's time). This compiles it from the run spec (default
`configs/minilm_sentiment.yaml`), runs it once in the simulator on zeros of its shapes
with SPU's pphlo, hal and mpc profiles on, and prints the MPC kernels (rank 0's view:
mmul_aa, trunc_a, msb_a2b, ...) by wall time, with the calls and bytes of each. Wall time
is noisy on a shared host; bytes and rounds are exact. Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from secfwt_jax.compile import protocols
from secfwt_jax.compile.artifacts import compile_cached
from secfwt_jax.compile.profiler import profile_artifact
from secfwt_jax.compile.spec_programs import programs_of_run
from secfwt_jax.files import write_json_atomic
from secfwt_jax.run.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "spec", nargs="?", type=Path, default=ROOT / "configs" / "minilm_sentiment.yaml"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "trunk_profile.json"
    )
    args = ap.parse_args()
    try:
        spec = load_spec(args.spec, args.set)
    except ValueError as error:  # SpecError: one line naming the field or file
        raise SystemExit(f"trunk_profile: error: {error}") from None
    program = programs_of_run(spec).trunk
    if program is None:
        raise SystemExit(f"{args.spec}: the run has no cached trunk (tuning.trainable.cache_trunk)")
    preset = protocols.preset_of(spec)
    artifact, _ = compile_cached(program, preset, None)
    cost = profile_artifact(artifact, program.args, preset)
    kernels = sorted(cost.per_section.get("mpc", {}).items(), key=lambda kv: -kv[1].time)
    total = sum(c.time for _, c in kernels) or 1.0
    print(f"{spec.name} trunk: {cost.total_bytes / 1e9:,.2f} GB, {cost.max_rounds:,.0f} rounds, "
          f"{cost.compute_s:,.1f} s wall ({preset.name}; MPC kernels sum to {total:,.1f} s at rank 0)")  # fmt: skip
    for name, c in kernels[:15]:
        print(f"  {name:24s} {c.time:8.2f} s {100 * c.time / total:5.1f}%  {c.calls:6d} calls  {c.bytes / 1e6:10,.1f} MB")  # fmt: skip
    write_json_atomic(args.out, {"spec": str(args.spec), "overrides": args.set, "protocol": preset.name,
                                 "total_bytes": cost.total_bytes, "rounds": cost.max_rounds,
                                 "seconds": cost.compute_s, "date": time.strftime("%Y-%m-%d"),
                                 "mpc_kernels": {k: c.to_dict() for k, c in kernels},
                                 "hal": {k: c.to_dict() for k, c in cost.per_section.get("hal", {}).items()}},
                      indent=1)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
