"""Accuracy study on a real instruct LLM: SmolLM2-135M-Instruct's next-token verbalizer on
the bundled sentiment corpus, in plaintext, with the programs the MPC run runs.

    .venv/bin/python benchmarks/llm_accuracy.py [--ks 16 64] [--seeds 0 1 2] [--test 400]
        [--out benchmarks/results/llm_accuracy.json]

Everything is built from `configs/smollm2_sentiment.yaml` (`--set` overrides it) by
`run.build`: the model owner's inputs, the trainable set (LoRA r = 4 on the top layer's q
and v, the lower layers cached once per example, as under MPC), the SPSA step program and
the predict program. Rows:

- zero-shot: the chat prompt and verbalizer, LoRA B = 0 (the model itself);
- SPSA/MeZO on the LoRA set: the spec's SPSA step (its eps and directions; K from
  `--directions`, 16 by default: the MPC spec uses fewer to stay cheap on two cores);
- backprop (Adam) on the same LoRA set: the plaintext fine-tuning ceiling;
- the paper's prompt methods on a deep subspace prompt (p = A z, P = 10 slots, d = 500, at
  the top layer's input over the same cached trunk; `sets.TrainableSpec("prompt",
  cache_trunk=True)`): CMA-ES (BBT; population 20, the spec's `population_loss` program)
  and SPSA on z (the spec's SPSA step program).

Step sizes: each candidate runs once, evaluated on a validation split drawn from the
training pool (k/2 per class, never the test rows) and on the test rows at every
checkpoint; the candidate with the lowest validation loss at the end of the budget is the
row's result (validation accuracy over 2 x k/2 examples moves in steps of 1/k and was too
coarse to choose by). Every candidate's curves are kept in the JSON.

Curves are test accuracy against example-forwards (an SPSA step costs 2K forwards of a
minibatch, an Adam step one forward and one backward, counted as 3 forwards' compute).
A curve "flattens" at the first checkpoint after which it never gains another point.
A CMA-ES generation costs `population` forwards of a minibatch. CMA-ES has no step size to
search: the prompt enters through the top layer's RMSNorm, so the loss depends on the
direction of z only and the search from z = 0 is the same at any sigma0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

from secfwt_jax.data.sampling import k_shot_splits
from secfwt_jax.files import write_json_atomic
from secfwt_jax.models.checkpoint import load_tokenizer
from secfwt_jax.models.classifier import cross_entropy_loss
from secfwt_jax.run import build
from secfwt_jax.run.spec import load_spec
from secfwt_jax.tuning.sets import TrainableSpec

SPEC = Path(__file__).resolve().parents[1] / "configs" / "smollm2_sentiment.yaml"
METHODS = ("spsa_lora", "adam_lora", "cma_prompt", "spsa_prompt")
# The deep subspace prompt: BBT's intrinsic dimension, 10 slots at the top layer's input.
PROMPT = TrainableSpec("prompt", prompt_length=10, intrinsic_dim=500, top_layers=1, cache_trunk=True)  # fmt: skip


def encode_rows(spec, data, rows, tokenizer, batch: int) -> list[dict]:
    """Int-id chunks of `batch` rows (the plaintext form), labels one-hot."""
    out = []
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        if len(part) < batch:  # pad by repeating (their predictions are dropped)
            part = np.concatenate([part, np.resize(part, batch - len(part))])
        out.append(build._encode(spec, data, part, tokenizer, None))
    return out


def features(trunk, lower, chunks):
    return [{**trunk(lower, {k: v for k, v in c.items() if k != "labels"}), "labels": c["labels"]} for c in chunks]  # fmt: skip


def accuracy(predict, theta, frozen, chunks, n: int) -> float:
    preds = np.concatenate([np.argmax(np.asarray(predict(theta, frozen, c)), -1) for c in chunks])
    labels = np.concatenate([np.argmax(c["labels"], -1) for c in chunks])
    return float(np.mean(preds[:n] == labels[:n]))


def run_spsa(spec, programs, theta, frozen, train, lr: float, steps: int, every: int, evaluate):
    step = jax.jit(programs.step.fn)
    k = spec.tuning.spsa.num_directions
    batch = train[0]["labels"].shape[0]
    curve = [(0, evaluate(theta))]
    for i in range(steps):
        z = build.step_directions(spec, i, programs.problem.trainable)
        c = train[i % len(train)]
        x = {k_: v for k_, v in c.items() if k_ != "labels"}
        theta, _ = step(theta, frozen, x, c["labels"], z, np.float32(lr))
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append(((i + 1) * 2 * k * batch, evaluate(theta)))
    return theta, curve


def run_adam(programs, theta, frozen, train, lr: float, steps: int, every: int, evaluate):
    loss_fn = cross_entropy_loss(programs.problem.logits)
    opt = optax.adam(lr)
    state = opt.init(theta)

    @jax.jit
    def step(t, s, c):
        grads = jax.grad(lambda t_: loss_fn(t_, frozen, c))(t)
        updates, s = opt.update(grads, s, t)
        return optax.apply_updates(t, updates), s

    batch = train[0]["labels"].shape[0]
    curve = [(0, evaluate(theta))]
    for i in range(steps):
        theta, state = step(theta, state, train[i % len(train)])
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append(((i + 1) * 3 * batch, evaluate(theta)))
    return theta, curve


def run_cma(programs, frozen, train, population: int, generations: int, every: int, evaluate):
    """BBT's CMA-ES on z: each generation scores its candidates on one minibatch (cycled
    in order, as `secfwt finetune` does) with the population program; the answer is the
    distribution mean (`cmaes.solution`)."""
    from secfwt_jax.tuning import cmaes

    population_loss = jax.jit(programs.population_loss.fn)
    dim = programs.problem.trainable["z"].shape[0]
    es = cmaes.start_strategy(dim, cmaes.CmaConfig(population, 1.0, generations, 0))
    batch = train[0]["labels"].shape[0]
    theta = cmaes.solution(es)
    curve = [(0, evaluate(theta))]
    for g in range(generations):
        candidates = cmaes.ask(es)
        c = train[g % len(train)]
        x = {k_: v for k_, v in c.items() if k_ != "labels"}
        losses = population_loss({"z": candidates}, frozen, x, c["labels"])
        cmaes.tell(es, candidates, np.asarray(losses))
        if (g + 1) % every == 0 or g + 1 == generations:
            theta = cmaes.solution(es)
            curve.append(((g + 1) * population * batch, evaluate(theta)))
    return theta, curve


def evaluator(programs, frozen, feats: dict, n: dict):
    """theta -> {dev_loss, dev, test}: the validation loss that picks a step size, and
    the validation and test accuracy (padding rows dropped)."""
    predict = jax.jit(programs.predict.fn)
    loss_fn = jax.jit(cross_entropy_loss(programs.problem.logits))

    def evaluate(theta) -> dict:
        dev_loss = float(np.mean([loss_fn(theta, frozen, c) for c in feats["dev"]]))
        acc = {name: accuracy(predict, theta, frozen, feats[name], n[name]) for name in ("dev", "test")}  # fmt: skip
        return {"dev_loss": dev_loss, **acc}

    return evaluate


def flattening_budget(curve, gain: float = 0.01) -> int:
    """The first checkpoint's forwards after which test accuracy never rises `gain` more."""
    for i, (forwards, acc) in enumerate(curve):
        if all(later <= acc + gain for _, later in curve[i + 1 :]):
            return forwards
    return curve[-1][0]


def search(runner, grid, evaluate) -> dict:
    """Run every step size once; the lowest final validation loss picks the row."""
    runs = {lr: runner(lr, evaluate)[1] for lr in grid}
    best = min(grid, key=lambda lr: runs[lr][-1][1]["dev_loss"])
    curve = [(f, e["test"]) for f, e in runs[best]]
    return {"lr": best, "final": curve[-1][1], "curve": curve,
            "flattens_at_forwards": flattening_budget(curve),
            "candidates": {str(lr): runs[lr] for lr in grid}}  # fmt: skip


def study(spec, k: int, seed: int, args, log) -> dict:
    spec = spec.replace(data={**spec.data.model_dump(), "k": k, "seed": 13 + seed, "test_size": args.test})  # fmt: skip
    spsa_cfg = dataclasses.replace(spec.tuning.spsa, num_directions=args.directions)
    spec = spec.replace(tuning=spec.tuning.model_copy(update={"spsa": spsa_cfg}))
    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    head = build.head_config(spec, tokenizer)
    theta0, frozen_all, public = build.model_owner_inputs(spec, head, private_seed=seed, log=lambda m: None)  # fmt: skip
    data = build.load_data(spec)
    splits = k_shot_splits(data, k, spec.data.seed, dev_k=max(4, k // 2), test_size=args.test, stratify_test=True)  # fmt: skip
    b = args.batch
    chunks = {name: encode_rows(spec, part, np.arange(len(part)), tokenizer, b)
              for name, part in (("train", splits.train), ("dev", splits.dev), ("test", splits.test))}  # fmt: skip
    shapes = build.shapes_of({k_: v for k_, v in chunks["train"][0].items() if k_ != "labels"})
    data_public = {"train_shapes": shapes, "eval_shapes": shapes, "label_shape": (b, len(spec.data.labels))}  # fmt: skip
    programs = build.build_programs(spec, public, head, data_public)
    lower, frozen = programs.frozen_parts(frozen_all)
    trunk = jax.jit(programs.trunk.fn)
    t0 = time.time()
    feats = {name: features(trunk, lower, c) for name, c in chunks.items()}
    log(f"k={k} seed={seed}: trunk features of {sum(len(c) for c in chunks.values()) * b} examples in {time.time() - t0:.0f} s")  # fmt: skip
    n = {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)}
    evaluate = evaluator(programs, frozen, feats, n)
    row = {"k": k, "seed": seed, "n": n, "zero_shot": evaluate(theta0)["test"]}
    log(f"  zero-shot test {row['zero_shot']:.3f}")

    def spsa_run(lr, e):
        return run_spsa(spec, programs, theta0, frozen, feats["train"], lr, args.spsa_steps, args.every, e)  # fmt: skip

    def adam_run(lr, e):
        return run_adam(programs, theta0, frozen, feats["train"], lr, args.adam_steps, args.every, e)  # fmt: skip

    # The prompt methods: the same cached trunk (the prompt enters at the same layer the
    # LoRA factors sit in), their own step and population programs.
    pspec = spec.replace(tuning=spec.tuning.model_copy(update={"trainable": PROMPT, "cma": spec.tuning.cma.model_copy(update={"population": args.population})}))  # fmt: skip
    z0 = {"z": np.zeros(PROMPT.intrinsic_dim, np.float32)}  # BBT starts at the origin
    ppublic = dataclasses.replace(public, trainable_shapes=build.shapes_of(z0))
    pprograms = build.build_programs(pspec, ppublic, head, data_public)
    assert pprograms.first_layer == programs.first_layer
    p_evaluate = evaluator(pprograms, frozen, feats, n)
    row["prompt_at_init"] = p_evaluate(z0)["test"]

    def spsa_prompt_run(lr, e):
        return run_spsa(pspec, pprograms, z0, frozen, feats["train"], lr, args.spsa_steps, args.every, e)  # fmt: skip

    def cma_run(_lr, e):
        return run_cma(pprograms, frozen, feats["train"], args.population, args.generations, args.every, e)  # fmt: skip

    searches = (
        ("spsa_lora", args.spsa_lrs, spsa_run, evaluate),
        ("adam_lora", args.adam_lrs, adam_run, evaluate),
        ("cma_prompt", [None], cma_run, p_evaluate),
        ("spsa_prompt", args.spsa_prompt_lrs, spsa_prompt_run, p_evaluate),
    )
    for method, grid, runner, ev_fn in searches:
        if method not in args.methods:
            continue
        t1 = time.time()
        row[method] = search(runner, grid, ev_fn)
        r = row[method]
        log(f"  {method}: lr {r['lr']}, test {r['curve'][0][1]:.3f} -> {r['final']:.3f} at {r['curve'][-1][0]} forwards, flat from {r['flattens_at_forwards']} ({time.time() - t1:.0f} s)")  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--directions", type=int, default=16, help="K, directions per SPSA step")
    ap.add_argument("--spsa-steps", type=int, default=200)
    ap.add_argument("--adam-steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--spsa-lrs", type=float, nargs="+", default=[1e-2, 3e-2])
    ap.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    ap.add_argument("--spsa-prompt-lrs", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--population", type=int, default=20, help="CMA-ES population (BBT: 20)")
    ap.add_argument("--generations", type=int, default=320, help="CMA-ES generations")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_accuracy.json"))
    args = ap.parse_args()
    spec = load_spec(SPEC, ["evaluation.plaintext_reference=false", *args.set])
    log = lambda m: print(m, flush=True)  # noqa: E731
    command = "benchmarks/llm_accuracy.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")  # fmt: skip
    # Rows of the same k and seed already in --out keep the methods this run does not run
    # (so the prompt rows can be added to a finished LoRA study); a method run again is
    # replaced.
    before = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows: list[dict] = before.get("rows", [])
    earlier = before.get("commands") or ([before["command"]] if "command" in before else [])
    commands = [*earlier, command]
    ks = sorted({*args.ks, *(r["k"] for r in rows)})
    for seed in args.seeds:  # seed-major: every k gets a first seed before any gets a second
        for k in args.ks:
            new = study(spec, k, seed, args, log)
            old = next((r for r in rows if (r["k"], r["seed"]) == (k, seed)), None)
            if old is None:
                rows.append(new)
            else:
                old.update(new)
            write_json_atomic(args.out, summarise(rows, ks, commands, log=None), indent=1)
    summarise(rows, ks, commands, log)


def summarise(rows: list[dict], ks, commands: list[str], log) -> dict:
    """Mean and std over seeds of each row's final test accuracy, per k (the file written
    after every configuration, so an interrupted study keeps what it finished)."""
    final = lambda r, m: r[m] if m == "zero_shot" else r[m]["final"]  # noqa: E731
    summary = {}
    for k in ks:
        mine = [r for r in rows if r["k"] == k]
        if not mine:
            continue
        methods = ("zero_shot", *(m for m in METHODS if all(m in r for r in mine)))
        summary[str(k)] = {m: {"mean": float(np.mean([final(r, m) for r in mine])),
                               "std": float(np.std([final(r, m) for r in mine])),
                               "seeds": len(mine)} for m in methods}  # fmt: skip
        for m in methods[1:]:
            flat = [r[m]["flattens_at_forwards"] for r in mine]
            summary[str(k)][m]["flattens_at_forwards"] = flat
        if log:
            log(f"k={k}: " + ", ".join(f"{m} {100 * v['mean']:.1f} ± {100 * v['std']:.1f}" for m, v in summary[str(k)].items()))  # fmt: skip
    return {"commands": commands, "spec": str(SPEC), "prompt": dataclasses.asdict(PROMPT), "rows": rows, "summary": summary}  # fmt: skip


if __name__ == "__main__":
    main()
