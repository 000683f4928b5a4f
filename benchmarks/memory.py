"""Peak memory of one SPSA step vs one forward pass (MeZO claims ~1x; goal: <= 1.2x).

Measured from XLA's static buffer assignment (no execution, deterministic): every
`jax.jit(f).lower(*abstract_args).compile()` is dumped (`--xla_dump_to`) and its
`*buffer-assignment.txt` read. The peak is XLA's "Total bytes used": every buffer the
program allocates (parameters, outputs, constants, the preallocated temp arena), so it is
the program's static footprint. `compile().memory_analysis()` would give the same split,
but the CPU backend of jaxlib 0.4.26 returns all zeros, hence the dump. Shapes: all-MiniLM-L6-v2 (22.7M params, fp32), batch 16 x 64 tokens, softmax
attention, linear head. "One forward" is the loss of one forward pass (params and batch
in, scalar out).

SPSA variants (K = 1 direction unless stated):
  batched            spsa_step, both perturbed forwards as ONE vmapped forward (default)
  sequential         spsa_step with lax.map over the 2K perturbed parameter sets
  seeded             spsa_step_seeded: z drawn in the jit (no z argument), lax.map
  ... + donate       the trainable argument donated, so the update is written in place
  inplace: <jit>     make_inplace_spsa_step (MeZO's in-place trick, plaintext only): each
                     of its jits (shift, loss, update) with theta donated
  inplace (step = max)  the step's peak: the largest of those jits, counting the frozen
                     parameters as resident during shift and update (between jits only
                     theta, frozen and scalar losses are live)

    .venv/bin/python benchmarks/memory.py        # ~1-3 min of compiling on 2 cores
    .venv/bin/python benchmarks/memory.py --variants inplace   # re-measure only these;
                     rows of an earlier run at the same shapes are kept
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

# XLA reads its flags when the backend starts: set the dump directory before jax runs.
DUMP = Path(tempfile.mkdtemp(prefix="secfwt_memory_"))
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={DUMP}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from secfwt_jax.files import write_json_atomic, write_text_atomic  # noqa: E402
from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained  # noqa: E402
from secfwt_jax.models.heads import HeadConfig  # noqa: E402
from secfwt_jax.tuning import sets, spsa, spsa_inplace  # noqa: E402
from secfwt_jax.tuning.loop import problem_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MB = 1e6
GOAL = 1.2  # the bound: SPSA step peak <= 1.2x one forward pass (MeZO)
DONATION_NOTE = (
    "In-place rows: `make_inplace_spsa_step` (secfwt_jax/tuning/spsa_inplace.py), a host "
    "sequence of jits (shift theta +- eps z, loss, restore-and-update) with theta donated "
    "to each. The shift and update rows are those jits alone; the step row is the largest "
    "jit plus, for shift and update, the frozen parameters that stay resident. Donation "
    "invalidates the caller's trainable arrays after every call: keep only the returned "
    "trainable (numpy inputs are copied to the device first, so they survive)."
)


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def batch_spec(batch: int, seq: int, classes: int = 2) -> dict:
    return {
        "input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32),
        "token_type_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
        "labels": jax.ShapeDtypeStruct((batch, classes), jnp.float32),
    }


ALLOCATION = re.compile(r"^allocation \d+: size (\d+), (.*)$")


def parse_buffer_assignment(text: str) -> dict:
    """Bytes by kind from an XLA buffer-assignment dump; `peak` = "Total bytes used"."""
    out = {"argument": 0, "output": 0, "temp": 0, "constant": 0, "alias": 0}
    for line in text.splitlines():
        match = ALLOCATION.match(line)
        if not match:
            continue
        size, what = int(match.group(1)), match.group(2)
        if what.startswith("parameter"):
            out["argument"] += size
            out["alias"] += size * ("live-out" in what)  # a donated input reused as output
        elif what.startswith("output") or "live-out" in what:
            out["output"] += size
        elif "temp" in what:
            out["temp"] += size
        elif what.startswith("constant"):
            out["constant"] += size
    out["peak"] = int(re.search(r"Total bytes used: (\d+)", text).group(1))
    return out


def memory(fn, *args, donate=()) -> dict:
    return lower_memory(jax.jit(fn, donate_argnums=donate), *args)


def lower_memory(jitted, *args) -> dict:
    """Buffer-assignment stats of an already-jitted function at abstract `args`."""
    before = set(DUMP.glob("*buffer-assignment.txt"))
    jitted.lower(*args).compile()
    new = sorted(set(DUMP.glob("*buffer-assignment.txt")) - before)
    if len(new) != 1:
        raise RuntimeError(f"memory: expected one new buffer assignment dump, got {len(new)}")
    return parse_buffer_assignment(new[0].read_text())


def measure_fused(problem, batch, k: int) -> dict:
    """{variant: memory stats} of the one-jit SPSA steps (the MPC-compilable form)."""
    loss_fn = problem_loss(problem)
    t, f = abstract(problem.trainable), abstract(problem.frozen)
    z = abstract(spsa.directions(0, 0, problem.trainable, k))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    rows = {}
    for batched in (True, False):
        cfg = spsa.SpsaConfig(num_directions=k, batched=batched)
        step = lambda t, f, b, z, lr, cfg=cfg: spsa.spsa_step(loss_fn, t, f, b, z, lr, cfg)  # noqa: E731
        name = "batched" if batched else "sequential"
        rows[name] = memory(step, t, f, batch, z, lr)
        rows[name + " + donate"] = memory(step, t, f, batch, z, lr, donate=(0,))
    cfg = spsa.SpsaConfig(num_directions=k, batched=False)
    seeded = lambda t, f, b, key, lr: spsa.spsa_step_seeded(loss_fn, t, f, b, key, lr, cfg)  # noqa: E731
    rows["seeded"] = memory(seeded, t, f, batch, key, lr)
    rows["seeded + donate"] = memory(seeded, t, f, batch, key, lr, donate=(0,))
    return rows


def measure_inplace(problem, batch, k: int) -> dict:
    """Each jit of `make_inplace_spsa_step` (theta donated) and the step's peak: their max.

    Between jits the host sequence holds only theta (donated in, returned out), the frozen
    parameters, the batch and scalar losses, so the step's peak is the largest single
    jit's footprint with the frozen parameters added where that jit does not take them.
    """
    step = spsa_inplace.make_inplace_spsa_step(
        problem_loss(problem), spsa.SpsaConfig(num_directions=k)
    )
    t, f = abstract(problem.trainable), abstract(problem.frozen)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    losses = jax.ShapeDtypeStruct((k,), jnp.float32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    parts = {
        "inplace: shift": lower_memory(step.shift, t, key, index, scalar),
        "inplace: loss": lower_memory(step.loss, t, f, batch),
        "inplace: update": lower_memory(step.update, t, key, losses, losses, scalar),
    }
    # shift and update do not take the frozen parameters, but those stay resident.
    frozen_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(problem.frozen))
    for name in ("inplace: shift", "inplace: update"):
        parts[name]["frozen_resident"] = frozen_bytes
    resident = {n: r["peak"] + r.get("frozen_resident", 0) for n, r in parts.items()}
    largest = max(resident, key=resident.get)
    step_row = {**parts[largest], "peak": resident[largest], "largest_jit": largest}
    return {**parts, "inplace (step = max)": step_row}


def measure(problem, batch, k: int, variants: list[str]) -> dict:
    """{variant: memory stats} for one trainable set; ratios against one forward."""
    loss_fn = problem_loss(problem)
    t, f = abstract(problem.trainable), abstract(problem.frozen)
    rows = {"forward": memory(lambda t, f, b: loss_fn(t, f, b), t, f, batch)}
    if "fused" in variants:
        rows.update(measure_fused(problem, batch, k))
    if "inplace" in variants:
        rows.update(measure_inplace(problem, batch, k))
    base = rows["forward"]["peak"]
    for r in rows.values():
        r["ratio_to_forward"] = r["peak"] / base
    return rows


def table(results: dict) -> str:
    lines = [
        "| trainable | variant | argument MB | output MB | temp MB | aliased MB | peak MB "
        "| x forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, rows in results.items():
        for name, r in rows.items():
            lines.append(
                f"| {spec} | {name} | {r['argument'] / MB:.1f} | {r['output'] / MB:.1f} | "
                f"{r['temp'] / MB:.1f} | {r['alias'] / MB:.1f} | {r['peak'] / MB:.1f} | "
                f"{r['ratio_to_forward']:.2f} |"
            )
    return "\n".join(lines)


def merge_previous(path: Path, out: dict) -> dict:
    """`out` with the rows of an earlier run at the same shapes kept where not re-measured."""
    if not path.exists():
        return out
    previous = json.loads(path.read_text())
    same = ("model", "batch", "seq", "directions", "backend")
    if any(previous.get(k) != out[k] for k in same):
        return out
    merged = {kind: dict(rows) for kind, rows in previous.get("results", {}).items()}
    for kind, rows in out["results"].items():
        merged.setdefault(kind, {}).update(rows)
    return {**out, "results": merged}


def verdict(results: dict, goal: float = GOAL) -> str:
    """One line per trainable set: does the lean step's peak stay within `goal` x forward?"""
    lines = []
    for kind, rows in results.items():
        lean = rows.get("inplace (step = max)")
        if lean is not None:
            holds = "holds" if lean["ratio_to_forward"] <= goal else "does NOT hold"
            lines.append(
                f"- {kind}: in-place SPSA peak {lean['peak'] / MB:.1f} MB = "
                f"{lean['ratio_to_forward']:.2f}x one forward ({lean['largest_jit']} is the "
                f"largest jit): <= {goal}x {holds}."
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--directions", type=int, default=1)
    p.add_argument("--sets", nargs="+", default=["full", "bitfit"])
    p.add_argument("--variants", nargs="+", default=["fused", "inplace"],
                   choices=["fused", "inplace"])  # fmt: skip
    args = p.parse_args(argv)
    started = time.time()
    classifier, params = load_pretrained(
        bundled_minilm_dir(), head=HeadConfig(pooling="mean"), gelu_impl="piecewise"
    )
    batch = batch_spec(args.batch, args.seq)
    results = {}
    for kind in args.sets:
        problem = sets.build_problem(sets.TrainableSpec(kind, lora_rank=8), classifier, params)
        results[kind] = measure(problem, batch, args.directions, args.variants)
        print(f"[{time.time() - started:.0f}s] {kind} done", flush=True)
    out = {
        "model": "all-MiniLM-L6-v2", "batch": args.batch, "seq": args.seq,
        "directions": args.directions, "backend": jax.default_backend(),
        "peak_definition": "XLA buffer assignment 'Total bytes used' (static footprint)",
        "goal_ratio_to_forward": GOAL,
        "results": results,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = merge_previous(RESULTS / "memory.json", out)
    md = table(out["results"]) + "\n\n" + verdict(out["results"]) + "\n\n" + DONATION_NOTE
    write_json_atomic(RESULTS / "memory.json", out)
    write_text_atomic(RESULTS / "memory.md", md + "\n")
    print(md)
    shutil.rmtree(DUMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
