"""The main run's frozen trunk, this checkout against an earlier revision, side by side.

    .venv/bin/python benchmarks/trunk_speed.py --baseline REV [RUN.yaml] [--set KEY=VALUE ...]
        [--reps N] [--out FILE]

Both programs are compiled from the same run spec (default `configs/minilm_sentiment.yaml`)
by their own code: the baseline's tracked files are exported with `git archive` into a
temporary tree laid out as the installed package, and each run is a fresh interpreter on
one tree or the other, alternating (baseline, current, baseline, ...), so drift on a shared
host falls on both. Each run compiles the trunk (not timed) and executes it once in the
simulator with the communication profile on, as `secfwt finetune` does, on zeros of its
shapes (MPC time does not depend on the values). A run does not inherit OMP_THREAD_LIMIT:
each revision's code sets what it sets. Prints the medians and their ratio; bytes and
rounds are exact. Writes JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from secfwt_jax.compile.threads import THREAD_LIMIT_ENV, available_cores
from secfwt_jax.files import write_json_atomic
from secfwt_jax.run.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

#: What one run does, in the tree on its PYTHONPATH: one JSON line on stdout.
RUN_TRUNK = """
import json, sys
from secfwt_jax.compile import protocols
from secfwt_jax.compile.artifacts import compile_cached
from secfwt_jax.compile.profiler import profile_artifact
from secfwt_jax.compile.spec_programs import programs_of_run
from secfwt_jax.run.spec import load_spec
spec = load_spec(sys.argv[1], sys.argv[2:])
program = programs_of_run(spec).trunk
preset = protocols.preset_of(spec)
artifact, _ = compile_cached(program, preset, None)
cost = profile_artifact(artifact, program.args, preset)
print("TRUNK " + json.dumps({"seconds": cost.compute_s, "bytes": cost.total_bytes,
                             "rounds": cost.max_rounds}))
"""


def package_tree(rev: str | None, into: Path) -> Path:
    """The package of ``rev`` (None: this work tree's tracked files) laid out as installed:
    compile/ and runtime/ inside secfwt_jax/, configs beside them."""
    paths = ["secfwt_jax", "compile", "runtime", "configs"]
    if rev is None:
        files = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        for f in files:
            (into / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, into / f)
    else:
        archive = subprocess.run(["git", "archive", rev, *paths], cwd=ROOT, capture_output=True, check=True).stdout  # fmt: skip
        with tempfile.TemporaryFile() as tmp:
            tmp.write(archive)
            tmp.seek(0)
            with tarfile.open(fileobj=tmp) as tar:
                tar.extractall(into, filter="data")
    for sub in ("compile", "runtime"):
        (into / sub).rename(into / "secfwt_jax" / sub)
    (into / "secfwt_jax" / "configs").symlink_to(into / "configs")
    return into


def run_trunk(tree: Path, spec: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != THREAD_LIMIT_ENV}
    env["PYTHONPATH"] = str(tree)
    # cwd: `python -c` puts it first on sys.path, ahead of PYTHONPATH
    proc = subprocess.run([sys.executable, "-c", RUN_TRUNK, str(spec), *overrides], cwd=tree, env=env, capture_output=True, text=True)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("TRUNK ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"trunk_speed: the run in {tree} failed: {tail[0]}")
    return json.loads(lines[-1][len("TRUNK ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", type=Path, default=ROOT / "configs" / "minilm_sentiment.yaml")  # fmt: skip
    ap.add_argument("--baseline", required=True, help="git revision to compare against")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trunk_speed.json")  # fmt: skip
    args = ap.parse_args()
    try:
        load_spec(args.spec, args.set)
    except ValueError as error:  # SpecError: one line naming the field or file
        raise SystemExit(f"trunk_speed: error: {error}") from None
    revs = {"baseline": args.baseline, "current": None}
    described = {
        "baseline": subprocess.run(
            ["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "current": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
    }
    if not described["baseline"]:
        raise SystemExit(f"trunk_speed: error: --baseline {args.baseline}: not a git revision")
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="trunk_speed-") as tmp:
        trees = {name: package_tree(rev, Path(tmp) / name) for name, rev in revs.items()}
        for rep in range(args.reps):
            for name in ("baseline", "current"):
                runs[name].append(run_trunk(trees[name], args.spec.resolve(), args.set))
                r = runs[name][-1]
                print(f"  rep {rep + 1} {name:8s} {r['seconds']:8.1f} s  {r['bytes'] / 1e9:6.2f} GB  {r['rounds']:,.0f} rounds", flush=True)  # fmt: skip
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    speedup = median["baseline"] / median["current"]
    print(f"trunk of {args.spec.name}: baseline {described['baseline']} {median['baseline']:.1f} s, "
          f"current {described['current']} {median['current']:.1f} s (medians of {args.reps}): "
          f"{speedup:.2f}x faster")  # fmt: skip
    write_json_atomic(args.out, {"spec": str(args.spec), "overrides": args.set, "revisions": described,
                                 "date": time.strftime("%Y-%m-%d"), "cores": available_cores(),
                                 "runs": runs, "median_seconds": median, "speedup": speedup},
                      indent=1)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
