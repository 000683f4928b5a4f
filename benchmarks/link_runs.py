"""Measured runs over shaped links: wall time split into compute and waiting, beside the
network model's estimate for the same programs.

For each run spec (the tiny preset, and the shipped MiniLM spec at reduced size) this
  1. profiles the run's programs (`compile.spec_programs.profile_run`: bytes and rounds per
     call, times the calls the run makes), which is what `compile/network.py` turns into
     seconds;
  2. launches the spec on three loopback SecretFlow parties with every link through the
     user-space shaper (`runtime/link_shaper.py`), once per profile: `none` (relayed,
     unshaped: the compute baseline), then `lan`, `wan`, `edge`;
  3. reads the model owner's report: seconds per phase. The MPC phases (frozen trunk,
     evaluations, tuning, delivery) run the profiled programs; load and compile run none.

Then, per profile: compute = the MPC phases' seconds at `none`; waiting = the MPC phases'
seconds at this profile minus compute; estimate = `NetworkModel(bandwidth, latency)` on
the profile's bytes per party and rounds; and the ratio waiting / estimate. The relays
also count what really crossed each link (SPU and SecretFlow bytes apart).

    .venv/bin/python benchmarks/link_runs.py --out benchmarks/results/link_runs.json

Not a test: the edge runs take minutes. JSON goes to --out (atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from secfwt_jax.compile.network import NetworkModel
from secfwt_jax.compile.spec_programs import input_share_bytes, profile_run
from secfwt_jax.files import write_json_atomic
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster_run import launch_local
from secfwt_jax.runtime.link_shaper import PROFILES

ROOT = Path(__file__).resolve().parents[1]

#: The runs: (name, spec, overrides). The MiniLM spec is the shipped main run, reduced to
#: 2 training and 2 test examples at 8 tokens, 2 steps of 4 directions, so that an edge
#: link finishes in minutes; the model is the whole real 6-layer MiniLM.
RUNS = {
    "tiny": ("configs/tiny.yaml", []),
    "minilm_reduced": (
        "configs/minilm_sentiment.yaml",
        ["data.k=1", "data.max_len=8", "tuning.batch_size=2", "tuning.steps=2",
         "tuning.spsa.num_directions=4", "evaluation.mpc_examples=2", "evaluation.batch_size=2"],
    ),
}  # fmt: skip
MPC_PHASES = ("trunk", "eval_before", "tuning", "eval_after", "deliver")


def model_of(profile: str) -> NetworkModel | None:
    shape = PROFILES[profile]
    if shape.bandwidth_bps is None:
        return None
    return NetworkModel(profile, shape.bandwidth_bps, shape.latency_s)


def one_launch(spec, spec_path: str, overrides: list[str], profile: str, seed: int, work: Path) -> dict:  # fmt: skip
    relays: list = []
    t0 = time.monotonic()
    results = launch_local(spec, spec_path, overrides, seed, out_dir=work / "out", timeout_s=3600,
                           work_dir=work / "launch", link=profile, relays=relays)  # fmt: skip
    wall = time.monotonic() - t0
    report = json.loads(Path(results[spec.parties.model_owner]["report"]).read_text())
    seconds = report["seconds"]
    relayed = relays[0].relayed()
    spu_bytes = sum(sum(d.values()) for name, d in relayed.items() if name.startswith("spu"))
    sf_bytes = sum(sum(d.values()) for name, d in relayed.items() if name.startswith("sf"))
    return {"profile": profile, "wall_s": round(wall, 2), "seconds": seconds,
            "mpc_s": round(sum(seconds.get(p, 0.0) for p in MPC_PHASES), 2),
            "relayed_spu_bytes": spu_bytes, "relayed_sf_bytes": sf_bytes,
            "losses": results[spec.parties.data_owner]["losses"]}  # fmt: skip


def measure(name: str, profiles: list[str], repeats: int, seed: int, cache: Path, work: Path) -> dict:  # fmt: skip
    rel, overrides = RUNS[name]
    spec_path = str(ROOT / rel)
    spec = load_spec(spec_path, overrides)
    prof = profile_run(spec, cache, log=lambda m: None)
    runs = []
    for profile in profiles:
        for r in range(repeats):
            run = one_launch(
                spec, spec_path, overrides, profile, seed, work / f"{name}-{profile}-{r}"
            )
            runs.append(run)
            print(f"{name} {profile} #{r}: wall {run['wall_s']} s, MPC phases {run['mpc_s']} s, "
                  f"SPU bytes relayed {run['relayed_spu_bytes'] / 1e6:,.1f} MB", flush=True)  # fmt: skip
    return summarise({"spec": rel, "overrides": overrides, "spec_hash": spec.spec_hash,
                      "profiled_total_bytes": prof["run_total_bytes"],
                      "profiled_rounds_per_party": prof["run_total_rounds"],
                      "profiled_bytes_per_party": prof["run_total_bytes"] / prof["world_size"],
                      "input_share_bytes_per_party": prof["input_share_bytes_per_party"],
                      "runs": runs})  # fmt: skip


def summarise(res: dict) -> dict:
    """`res` with its rows: per profile, the medians, and waiting against two estimates:
    the programs' bytes and rounds alone, and with the owners' shares added (which cross
    the SecretFlow links inside the measured phases, before the programs run)."""
    runs = res["runs"]
    profiles = list(dict.fromkeys(r["profile"] for r in runs))
    compute = statistics.median(r["mpc_s"] for r in runs if r["profile"] == "none")
    rows = []
    for profile in profiles:
        mine = [r for r in runs if r["profile"] == profile]
        mpc = statistics.median(r["mpc_s"] for r in mine)
        net = model_of(profile)
        row = {"profile": profile, "mpc_s": round(mpc, 2), "compute_s": round(compute, 2),
               "waiting_s": round(mpc - compute, 2), "wall_s": statistics.median(r["wall_s"] for r in mine)}  # fmt: skip
        if net is not None:
            programs = net.breakdown(
                res["profiled_bytes_per_party"], res["profiled_rounds_per_party"]
            )
            inputs = net.transfer_s(res["input_share_bytes_per_party"])
            row.update(estimate_programs_s=round(programs["total_s"], 2),
                       estimate_transfer_s=round(programs["transfer_s"], 2),
                       estimate_latency_s=round(programs["latency_s"], 2),
                       estimate_inputs_s=round(inputs, 2),
                       estimate_s=round(programs["total_s"] + inputs, 2),
                       waiting_over_programs_estimate=round(row["waiting_s"] / programs["total_s"], 3),
                       waiting_over_estimate=round(row["waiting_s"] / (programs["total_s"] + inputs), 3))  # fmt: skip
        rows.append(row)
    return {**res, "rows": rows}


def table(results: dict) -> str:
    lines = ["| run | link | MPC phases (s) | compute (s) | waiting (s) | estimate (s): programs' transfer + latency + owners' shares | waiting / estimate | without the shares |",  # fmt: skip
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, res in results.items():
        for row in res["rows"]:
            if "estimate_s" not in row:
                lines.append(f"| {name} | {row['profile']} | {row['mpc_s']} | {row['compute_s']} | | | | |")  # fmt: skip
                continue
            est = f"{row['estimate_s']} = {row['estimate_transfer_s']} + {row['estimate_latency_s']} + {row['estimate_inputs_s']}"  # fmt: skip
            lines.append(f"| {name} | {row['profile']} | {row['mpc_s']} | {row['compute_s']} | {row['waiting_s']} | {est} | {row['waiting_over_estimate']:.2f} | {row['waiting_over_programs_estimate']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--profiles", nargs="+", default=["none", "lan", "wan", "edge"], choices=sorted(PROFILES))  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="launches per profile (medians)")
    ap.add_argument("--private-seed", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "link_runs.json"))
    ap.add_argument("--summarise", metavar="JSON", help="only recompute the rows and the table of a saved --out (adds the owners' shares if missing)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        for res in saved["results"].values():
            if "input_share_bytes_per_party" not in res:
                res["input_share_bytes_per_party"] = input_share_bytes(load_spec(ROOT / res["spec"], res["overrides"]))  # fmt: skip
        saved["results"] = {name: summarise(res) for name, res in saved["results"].items()}
        write_json_atomic(args.out, saved)
        print(table(saved["results"]))
        return 0
    if "none" not in args.profiles:
        ap.error("--profiles: 'none' is needed, it is the compute baseline")
    profiles = ["none"] + [p for p in args.profiles if p != "none"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="secfwt-links-") as tmp:
        for name in args.runs:
            results[name] = measure(name, profiles, args.repeats, args.private_seed, Path(tmp) / "cache", Path(tmp))  # fmt: skip
            print(table({name: results[name]}), flush=True)
    write_json_atomic(args.out, {"command": "benchmarks/link_runs.py", "args": vars(args), "results": results})  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
