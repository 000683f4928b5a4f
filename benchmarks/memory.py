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

    .venv/bin/python benchmarks/memory.py        # ~1-3 min of compiling on 2 cores
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

from secfwt_jax.models.checkpoint import bundled_minilm_dir, load_pretrained  # noqa: E402
from secfwt_jax.models.heads import HeadConfig  # noqa: E402
from secfwt_jax.tuning import sets, spsa  # noqa: E402
from secfwt_jax.tuning.loop import problem_loss  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MB = 1e6


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
    before = set(DUMP.glob("*buffer-assignment.txt"))
    jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    new = sorted(set(DUMP.glob("*buffer-assignment.txt")) - before)
    if len(new) != 1:
        raise RuntimeError(f"memory: expected one new buffer assignment dump, got {len(new)}")
    return parse_buffer_assignment(new[0].read_text())


def measure(problem, batch, k: int) -> dict:
    """{variant: memory stats} for one trainable set."""
    loss_fn = problem_loss(problem)
    t, f = abstract(problem.trainable), abstract(problem.frozen)
    z = abstract(spsa.directions(0, 0, problem.trainable, k))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    rows = {"forward": memory(lambda t, f, b: loss_fn(t, f, b), t, f, batch)}
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--directions", type=int, default=1)
    p.add_argument("--sets", nargs="+", default=["full", "bitfit"])
    args = p.parse_args(argv)
    started = time.time()
    classifier, params = load_pretrained(bundled_minilm_dir(), head=HeadConfig(pooling="mean"))
    batch = batch_spec(args.batch, args.seq)
    results = {}
    for kind in args.sets:
        problem = sets.build_problem(sets.TrainableSpec(kind, lora_rank=8), classifier, params)
        results[kind] = measure(problem, batch, args.directions)
        print(f"[{time.time() - started:.0f}s] {kind} done", flush=True)
    md = table(results)
    out = {
        "model": "all-MiniLM-L6-v2", "batch": args.batch, "seq": args.seq,
        "directions": args.directions, "backend": jax.default_backend(),
        "peak_definition": "XLA buffer assignment 'Total bytes used' (static footprint)",
        "results": results,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path, text in ((RESULTS / "memory.json", json.dumps(out, indent=2)),
                       (RESULTS / "memory.md", md + "\n")):  # fmt: skip
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(md)
    shutil.rmtree(DUMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
