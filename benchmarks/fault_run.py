"""Fault run: K loopback jobs of a run spec under random process or link faults.

Each job runs the spec on three SecretFlow party processes with a checkpoint every step.
A fault injector, driven by one seeded RNG, after a random step's checkpoint:
  --faults process (default):
  - SIGKILLs a random party (a crash), or
  - SIGSTOPs a random party for a random 1-8 s and then SIGCONTs it (a hung host: its
    sockets keep accepting, its traffic stops);
  --faults link (every link through the LAN profile of `runtime/link_shaper.py`; one
  random link of the 12, SecretFlow or SPU, one direction of one pair; the kinds in turn
  by job, so that three jobs try each):
  - cut: every connection of the link is reset and new ones refused for 1-30 s;
  - stall: one direction holds its bytes for 1-30 s (none is lost);
  - slow: the link's bandwidth drops to 1% for 10 s;
and the job is relaunched with --resume after every failure, up to --max-restarts times.
A link fault's record says how long after the fault began the run moved again (the next
checkpoint at every party) or stopped (the launch returned an error): the hang.
It reports, per job and in total: completed, resumed (relaunches), failed, the steps lost
(steps recomputed after a resume), and whether the final parameters differ from the
uninterrupted simulator run with the same seeds (relative gap > --tolerance).

    .venv/bin/python benchmarks/fault_run.py --jobs 3 --out benchmarks/results/fault_run.json
    .venv/bin/python benchmarks/fault_run.py --faults link --links spu --jobs 3 --out benchmarks/results/link_faults.json

Not a test: it takes minutes per job. JSON goes to --out (atomically).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from secfwt_jax.files import write_json_atomic
from secfwt_jax.run import checkpoints
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster_run import launch_local, load_theta
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.launcher import PartyFailedError, PartyProcess
from secfwt_jax.runtime.sim_run import finetune_in_simulator

ROOT = Path(__file__).resolve().parents[1]


def newest_step(out: Path, party: str, spec_hash: str) -> int:
    """The newest complete checkpoint `party` holds of this spec (0: none)."""
    return max(checkpoints.held_steps(out, party, spec_hash, "cluster", verify=False), default=0)


def inject(rng: random.Random, procs: list[PartyProcess], out: Path, spec, done: threading.Event) -> dict:  # fmt: skip
    """One fault, chosen by `rng`, once the job has made some progress."""
    kind = rng.choice(["kill", "stall"])
    party = rng.choice(["alice", "bob", "carol"])
    at = rng.randint(1, max(1, spec.tuning.steps - 2))
    while not done.is_set() and newest_step(out, party, spec.spec_hash) < at:
        time.sleep(0.05)
    if done.is_set():
        return {"kind": kind, "party": party, "after_step": at, "injected": False}
    pid = next(pp.pid for pp in procs if pp.party == party)
    if kind == "kill":
        os.kill(pid, signal.SIGKILL)
        return {"kind": kind, "party": party, "after_step": at, "injected": True}
    seconds = rng.uniform(1.0, 8.0)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)
    return {"kind": kind, "party": party, "after_step": at, "seconds": round(seconds, 2), "injected": True}  # fmt: skip


LINK_FAULTS = ("cut", "stall", "slow")


def common_step_now(out: Path, spec) -> int:
    return min(newest_step(out, p, spec.spec_hash) for p in spec.parties.compute)


def inject_link(rng: random.Random, relays: list, out: Path, spec, done: threading.Event, job: int = 0, links: str = "") -> dict:  # fmt: skip
    """One link fault (module doc): its kind by the job's number (cut, stall, slow, cut,
    ...), the rest by `rng`; and how long the run hung after it."""
    from secfwt_jax.runtime.link_shaper import PROFILES, LinkProfile

    kind = LINK_FAULTS[job % len(LINK_FAULTS)]
    at = rng.randint(1, max(1, spec.tuning.steps - 2))
    while not done.is_set() and (not relays or common_step_now(out, spec) < at):
        time.sleep(0.05)
    if done.is_set():
        return {"kind": kind, "after_step": at, "injected": False}
    shaper = relays[0]
    link = rng.choice(sorted(n for n in shaper.links if n.startswith(links)))
    record: dict[str, Any] = {"kind": kind, "link": link, "after_step": at, "injected": True}
    step = common_step_now(out, spec)
    start = time.monotonic()
    if kind == "cut":
        record["seconds"] = round(rng.uniform(1.0, 30.0), 2)
        shaper.cut(link, record["seconds"])
    elif kind == "stall":
        record["direction"] = rng.choice(["forward", "backward"])
        record["seconds"] = round(rng.uniform(1.0, 30.0), 2)
        shaper.stall(link, record["direction"], record["seconds"])
    else:
        lan = PROFILES["lan"]
        record["seconds"] = 10.0
        shaper.set_profile(link, LinkProfile(lan.bandwidth_bps * 0.01, lan.latency_s))
        done.wait(10.0)
        shaper.set_profile(link, lan)
    while not done.is_set() and common_step_now(out, spec) <= step and step < spec.tuning.steps:
        time.sleep(0.05)
    record["moved_or_stopped_after_s"] = round(time.monotonic() - start, 2)
    record["stopped"] = common_step_now(out, spec) <= step and step < spec.tuning.steps
    return record


def _record(record: dict, injector, *args, **kwargs) -> None:
    record.update(injector(*args, **kwargs))


def one_job(spec_path: str, overrides: list[str], seed: int, rng: random.Random, work: Path, max_restarts: int, fault_kind: str = "process", job: int = 0, links: str = "") -> dict[str, Any]:  # fmt: skip
    spec = load_spec(spec_path, overrides)
    out = work / "out"
    faults, attempts, lost = [], 0, 0
    while attempts <= max_restarts:
        procs: list[PartyProcess] = []
        relays: list = []
        done = threading.Event()
        record: dict[str, Any] = {}
        injector = None
        if attempts == 0:  # one fault per job, in its first launch
            how = (inject, procs) if fault_kind == "process" else (inject_link, relays)
            extra = {} if fault_kind == "process" else {"job": job, "links": links}
            injector = threading.Thread(target=_record, args=(record, how[0], rng, how[1], out, spec, done), kwargs=extra)  # fmt: skip
            injector.start()
        before = max((newest_step(out, p, spec.spec_hash) for p in spec.parties.compute), default=0)
        try:
            results = launch_local(spec, spec_path, overrides, seed, out_dir=out, timeout_s=900,
                                   work_dir=work / f"launch{attempts}", resume=attempts > 0, started=procs,
                                   link=None if fault_kind == "process" else "lan", relays=relays)  # fmt: skip
            error = None
        except PartyFailedError as failure:
            results, error = None, str(failure).splitlines()[0]
        done.set()
        if injector is not None:
            injector.join()
            faults.append(record)
        if results is not None:
            resumed_from = results["alice"]["resumed_from_step"]
            lost += max(0, before - resumed_from) if attempts else 0
            return {"completed": True, "launches": attempts + 1, "faults": faults, "steps_lost": lost,
                    "tuned": results[spec.parties.receiver]["tuned_params"]["path"], "last_error": None}  # fmt: skip
        held = {p: checkpoints.held_steps(out, p, spec.spec_hash, "cluster") for p in spec.parties.compute}  # fmt: skip
        reached = max((max(steps, default=0) for steps in held.values()), default=0)
        common = checkpoints.common_step(held)
        lost += reached - common
        faults.append({"error": error})
        attempts += 1
    return {"completed": False, "launches": attempts, "faults": faults, "steps_lost": lost, "tuned": None, "last_error": error}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="fault RNG seed")
    ap.add_argument("--private-seed", type=int, default=3)
    ap.add_argument("--max-restarts", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--faults", choices=["process", "link"], default="process", help="what fails (module doc)")  # fmt: skip
    ap.add_argument("--links", choices=["all", "spu", "sf"], default="all", help="--faults link: which links may fail")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_run.json"))
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.steps < 3:
        ap.error("--jobs must be >= 1 and --steps >= 3")
    overrides = [f"tuning.steps={args.steps}", "checkpoint.every=1", "checkpoint.keep=3"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="secfwt-fault-") as tmp:
        base = Path(tmp)
        spec = load_spec(args.spec, overrides)
        reference = finetune_in_simulator(spec, seeds=PrivateSeeds(args.private_seed), out_dir=base / "sim", progress=False, log=lambda m: None)  # fmt: skip
        want = load_theta(reference["tuned_params"]["path"])
        jobs = []
        for j in range(args.jobs):
            t0 = time.monotonic()
            job = one_job(args.spec, overrides, args.private_seed, rng, base / f"job{j}", args.max_restarts, args.faults, j, "" if args.links == "all" else args.links)  # fmt: skip
            job["seconds"] = round(time.monotonic() - t0, 1)
            tuned = job.pop("tuned")
            job["relative_gap"] = None if tuned is None else relative_gap(load_theta(tuned), want)
            job["differs"] = None if tuned is None else job["relative_gap"] > args.tolerance
            jobs.append(job)
            print(f"job {j}: {job}", flush=True)
    summary = {
        "jobs": len(jobs),
        "completed": sum(j["completed"] for j in jobs),
        "resumed": sum(j["launches"] - 1 for j in jobs),
        "failed": sum(not j["completed"] for j in jobs),
        "steps_lost": sum(j["steps_lost"] for j in jobs),
        "any_result_differs": any(j["differs"] for j in jobs),
        "longest_hang_s": max(
            (f.get("moved_or_stopped_after_s", 0.0) for j in jobs for f in j["faults"]), default=0.0
        ),  # fmt: skip
    }
    print(summary)
    write_json_atomic(args.out, {"command": "benchmarks/fault_run.py", "args": vars(args), "summary": summary, "jobs": jobs})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
