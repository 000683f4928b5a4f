"""`secfwt finetune`: one run, written once, driven on any backend.

`finetune_on(spec, backend, ...)` is the whole job. Every party's process runs it (on a
SecretFlow cluster) or one process plays every party (the in-process simulator). The data
flow is the same on both, and the backend enforces it:

1. the data owner loads the (public) tokenizer and publishes the head's verbalizer ids;
2. the model owner loads its checkpoint (or draws an inline model from its PRIVATE seed),
   splits it into trainable / frozen and publishes only the architecture and shapes;
3. the data owner samples its k-shot set from its file, tokenises it and publishes only
   shapes and counts;
4. every party builds the same programs from those public facts (`run.build`) and reports
   their compile-cache keys;
5. weights enter SPU as shares from the model owner, data and labels from the data owner;
6. with a cached trunk, the frozen lower layers run once per chunk under MPC and their
   activations stay shares;
7. test predictions before tuning are revealed to the data owner only;
8. SPSA steps (z and the step size public, theta secret between steps; the loss revealed
   to the data owner if it opted in) or CMA-ES generations (candidates public, their losses
   to the data owner, who runs CMA-ES in plaintext);
9. predictions after tuning, to the data owner only;
10. the tuned parameters to the receiving party only, which writes them (or, with
    `result_to: shares`, each party writes its own share and nobody learns them).

With `checkpoint.every`, each party writes its own shares of theta every N steps
(`run.checkpoints`); `resume_step` restarts the SPSA loop from such a step, which every
party must hold (the cluster handshake and `finetune_in_simulator` pick the newest common one).

The returned report holds what THIS process may know: on a cluster the data owner's report
has the losses and accuracies, the others' do not.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from secfwt_jax.compile.protocols import FIELD_BITS, preset_of
from secfwt_jax.run import build, checkpoints
from secfwt_jax.run.spec import RunSpec
from secfwt_jax.runtime.backend import Backend
from secfwt_jax.runtime.report import check_free_space, expected_output_bytes
from secfwt_jax.tuning.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class PrivateSeeds:
    """Each owner's own seed. The model owner's draws a fresh head, LoRA factors or inline
    weights; the data owner's draws a private run's samples and noise (`tuning.privacy`).
    Never in the spec, never sent: drawn in the owner's process (`model_owner_seed`,
    `_data_owner_seed`) or, for tests and reproducing a figure, given to that process alone
    (None: the data owner draws its own from the OS when a private run needs one)."""

    model_owner: int
    data_owner: int | None = None


#: The model owner's drawn seed, kept owner-only in its own output folder for --resume.
PRIVATE_SEED_FILE = "private_seed"


def model_owner_seed(out_dir: str | Path, party: str, resume: bool = False) -> int:
    """At an owner (the model owner's weights, or the data owner's private samples and
    noise): a fresh `PRIVATE_SEED_BITS`-bit seed from the OS, written 0600 to
    ``<out>/<party>/private_seed``, or with `resume` the one written there before (so a
    resumed run draws the same weights, samples and noise)."""
    from secfwt_jax.files import write_text_atomic
    from secfwt_jax.seeds import check_private_seed, fresh_private_seed

    path = Path(out_dir) / party / PRIVATE_SEED_FILE
    if resume and path.is_file():
        try:
            return check_private_seed(int(path.read_text().strip()), str(path))
        except ValueError:
            raise ValueError(f"{path}: not a private seed (an integer)") from None
    seed = fresh_private_seed()
    write_text_atomic(path, str(seed), private=True)
    return seed


# ---------------------------------------------------------------------- owner-side functions
def _data_owner_seed(given: int | None, out_dir: str, party: str, resume: bool) -> int:
    """At the data owner: the given seed (tests, reproducing a figure) or its own from
    the OS, kept 0600 in its own folder for --resume."""
    if given is not None:
        return given
    return model_owner_seed(out_dir, party, resume)


def _owner_head(spec: RunSpec):
    from secfwt_jax.models.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))
    return build.head_config(spec, tokenizer), tokenizer


def _check_range(spec, programs, theta, frozen, vocab: int, ring_bits: int, fraction_bits: int) -> bool:  # fmt: skip
    from secfwt_jax.models.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(spec.resolve(spec.model.tokenizer_path))  # public
    build.check_product_range(spec, programs, theta, frozen, tokenizer, vocab, ring_bits, fraction_bits)  # fmt: skip
    return True


def _data_owner_load(spec: RunSpec, head_and_tokenizer, vocab_size: int):
    return build.data_owner_inputs(spec, head_and_tokenizer[1], vocab_size)


def _accuracy(data: build.DataOwnerInputs, *predictions) -> dict[str, Any]:
    stacked = np.concatenate([np.asarray(p) for p in predictions], axis=0)
    pred = np.argmax(stacked[: len(data.eval_labels)], axis=-1)
    return {"accuracy": build.accuracy(stacked, data.eval_labels), "predictions": pred.tolist()}


def _save_params(theta: dict, path: str) -> str:
    from secfwt_jax.files import write_npz_atomic

    write_npz_atomic(path, build.flatten(theta), private=True)
    return path


# ---------------------------------------------------------------------- the job
@dataclasses.dataclass(frozen=True)
class OwnerInputs:
    """Handles to what each owner holds, at that owner only (a SecretFlow PYU object, or
    the value itself in the simulator): the model owner's trainable and frozen weights,
    the data owner's data, head and tokenizer, and its private-noise seed (None unless
    the run is private). Only the operator's plaintext reference in the simulator, which
    plays every party, reads them."""

    theta: Any
    frozen: Any
    data: Any
    head: Any
    dp_seed: Any


@dataclasses.dataclass(frozen=True)
class Finetuned:
    """A finished run as this process sees it: the report (public facts and what this
    party may see, nothing secret), the owners' input handles, and the run's programs."""

    report: dict[str, Any]
    owners: OwnerInputs
    programs: Any


class Progress:
    """tqdm progress: step, cumulative MB and rounds, and the loss where it is known."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=label, unit="step", disable=not enabled, dynamic_ncols=True)  # fmt: skip

    def update(self, cost, loss: float | None, epsilon: float | None = None) -> None:
        post = {}
        if cost is not None:
            post["MB"] = f"{cost.total_bytes / 1e6:,.0f}"
            post["rounds"] = f"{cost.max_rounds:,}"
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if epsilon is not None:
            post["eps"] = f"{epsilon:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def skip(self, steps: int) -> None:
        """Count steps done before this process started (a resumed run)."""
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()


def finetune_on(
    spec: RunSpec,
    backend: Backend,
    seeds: PrivateSeeds,
    *,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    resume_step: int = 0,
) -> Finetuned:
    """Run the job of `spec` on `backend` (module doc): this process's report, apart from
    the owners' input handles and the programs."""
    start = time.perf_counter()
    mo, do = spec.parties.model_owner, spec.parties.data_owner
    out_dir = Path(out_dir or spec.output_dir)
    report: dict[str, Any] = {"spec": spec.to_dict(), "spec_hash": spec.spec_hash, "party": backend.me or "all (simulator)"}  # fmt: skip
    timings: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    # 1-3: each owner loads its own inputs; only public facts are published.
    t = time.perf_counter()
    head_h = backend.at(do, _owner_head, spec)
    head = backend.publish(backend.at(do, lambda h: h[0], head_h))
    theta_h, frozen_h, model_pub_h = backend.at(
        mo, build.model_owner_inputs, spec, head, seeds.model_owner, log, num_returns=3
    )
    model_public = backend.publish(model_pub_h)
    vocab = model_public.model_config["vocab_size"]
    data_h = backend.at(do, _data_owner_load, spec, head_h, vocab)
    data_public = backend.publish(backend.at(do, lambda d: d.public(), data_h))
    counts = data_public["counts"]
    log(
        f"data owner: {counts['train']} training examples in {data_public['train_chunks']} "
        f"chunks of {spec.tuning.batch_size}, {counts['mpc_eval']} test examples under MPC, "
        f"{counts['test']} in the plaintext test split, {counts['max_len']} tokens"
    )
    digests = _input_digests(spec, backend, theta_h, frozen_h, data_h) if spec.checkpoint.every else {}  # fmt: skip
    for party, digest_h in digests.items() if resume_step else ():  # each owner checks its own
        backend.publish(backend.at(party, checkpoints.check_inputs, str(out_dir), party, resume_step, digest_h))  # fmt: skip
    t = mark("load", t)

    # 4: the programs, from public facts only.
    programs = build.build_programs(spec, model_public, head, data_public)
    elements = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(programs.problem.trainable))  # fmt: skip
    here = [backend.me] if backend.me else list(spec.parties.compute)
    check_free_space(out_dir, expected_output_bytes(spec, elements, here))
    ring = preset_of(spec)  # the model owner bounds what the programs compute, then shares
    backend.publish(backend.at(mo, _check_range, spec, programs, theta_h, frozen_h, vocab, FIELD_BITS[ring.field], ring.fxp_fraction_bits))  # fmt: skip
    compiled = {}
    for program in programs.needed(spec.tuning.method):
        compiled[program.name] = backend.compile(program)
        c = compiled[program.name]
        how = "cache hit" if c.cache_hit else f"compiled in {c.compile_seconds:.1f} s"
        log(f"program {program.name}: key {c.key[:16]}... ({how})")
    report["programs"] = {n: {"key": c.key, "cache_hit": c.cache_hit} for n, c in compiled.items()}
    t = mark("compile", t)

    # 5-6: shares from the owners; the frozen trunk once per chunk.
    backend.expect_inputs(build.shared_input_elements(model_public, data_public))
    lower_h, upper_h = backend.at(mo, programs.frozen_parts, frozen_h, num_returns=2)
    theta_s, frozen_s = backend.share(theta_h), backend.share(upper_h)

    def chunk(kind: str, i: int):
        return backend.share(backend.at(do, lambda d: getattr(d, kind)[i], data_h))

    train_x = [chunk("train_inputs", i) for i in range(data_public["train_chunks"])]
    train_y = [chunk("train_labels", i) for i in range(data_public["train_chunks"])]
    eval_x = [chunk("eval_inputs", i) for i in range(data_public["eval_chunks"])]
    if programs.trunk is not None:
        lower_s = backend.share(lower_h)
        trunk_eval = compiled.get("trunk_eval", compiled["trunk"])
        bar = Progress(len(train_x) + len(eval_x), "frozen trunk (MPC, once)", progress)

        def through(program, x):
            (h,) = backend.execute(program, lower_s, x)
            bar.update(backend.cost, None)
            return h

        try:
            train_x = [through(compiled["trunk"], x) for x in train_x]
            eval_x = [through(trunk_eval, x) for x in eval_x]
        finally:
            bar.close()
    t = mark("trunk", t)

    def evaluate(theta_secret) -> Any:
        preds = [backend.reveal_to(do, backend.execute(compiled["predict"], theta_secret, frozen_s, x)[0]) for x in eval_x]  # fmt: skip
        return backend.at(do, _accuracy, data_h, *preds)

    # 7: before.
    before_h = evaluate(theta_s)
    before = backend.local(before_h)
    if before is not None:
        log(f"data owner: MPC test accuracy before tuning {before['accuracy']:.3f}")
    t = mark("eval_before", t)

    # 8: tuning.
    if resume_step:
        log(f"resuming from the checkpoint of step {resume_step} that every party holds")
    plan = programs.privacy
    dp_seed_h = None
    if plan is not None:
        log(f"private run: (epsilon {plan.epsilon:.3g}, delta {plan.delta + plan.overflow_delta:.3g}) after {plan.steps} steps; noise multiplier {plan.noise_multiplier:.3g}, clip {plan.clip}, Poisson rate {plan.rate:.3g} ({plan.expected_batch:.3g} of {plan.num_rows} rows expected, padded to {plan.max_rows})")  # fmt: skip
        dp_seed_h = backend.at(do, _data_owner_seed, seeds.data_owner, str(out_dir), do, bool(resume_step))  # fmt: skip
        report["privacy"] = plan.summary()
    run = _Loop(spec, backend, compiled, programs, out_dir, resume_step, dp_seed_h, digests)
    losses_h, theta_s = run.tune(theta_s, frozen_s, train_x, train_y, data_h, progress)
    t = mark("tuning", t)

    # 9: after.
    after_h = evaluate(theta_s)
    after = backend.local(after_h)
    if after is not None:
        log(f"data owner: MPC test accuracy after tuning {after['accuracy']:.3f}")
    t = mark("eval_after", t)

    # 10: the result to its receiver only.
    receiver = spec.parties.receiver
    if receiver is not None:
        path = str(out_dir / receiver / "tuned_params.npz")
        saved = backend.at(receiver, _save_params, backend.reveal_to(receiver, theta_s), path)
        if backend.local(saved) is not None:
            report["tuned_params"] = {"party": receiver, "path": path}
    else:  # each party keeps its own share; nobody learns the tuned parameters
        paths = {p: out_dir / p / "tuned_shares.bin" for p in spec.parties.compute}
        backend.save_shares(theta_s, paths)
        report["tuned_shares"] = {p: str(paths[p]) for p in paths if backend.me in (None, p)}
    mark("deliver", t)

    losses = backend.local(losses_h) if losses_h is not None else None
    report.update(
        counts=counts,
        mpc={"accuracy_before": before and before["accuracy"], "accuracy_after": after and after["accuracy"],
             "predictions_before": before and before["predictions"], "predictions_after": after and after["predictions"],
             "losses": losses},
        cost={"total_bytes": backend.cost.total_bytes, "max_rounds": backend.cost.max_rounds,
              "per_program": backend.cost.per_program} if backend.cost is not None else None,
        seconds=timings | {"total": round(time.perf_counter() - start, 2)},
        resumed_from_step=resume_step,
        result_to=spec.parties.result_to,
    )  # fmt: skip
    owners = OwnerInputs(theta=theta_h, frozen=frozen_h, data=data_h, head=head_h, dp_seed=dp_seed_h)  # fmt: skip
    return Finetuned(report, owners, programs)


class _Loop:
    """The tuning loop: SPSA steps (checkpointed, resumable) or CMA-ES generations."""

    def __init__(self, spec, backend, compiled, programs, out_dir: Path, resume_step: int, dp_seed_h=None, digests=None):  # fmt: skip
        self.spec, self.backend, self.compiled, self.programs = spec, backend, compiled, programs
        self.out_dir, self.resume_step, self.dp_seed_h = Path(out_dir), resume_step, dp_seed_h
        self.digests = digests or {}  # party -> its handle of its own inputs' digest

    def tune(self, theta_s, frozen_s, train_x, train_y, data_h, progress):
        """Returns (the losses, held by the data owner, or None; theta as shares)."""
        spec, backend = self.spec, self.backend
        do = spec.parties.data_owner
        bar = Progress(
            spec.tuning.steps, f"{spec.tuning.method} ({spec.protocol.name}, MPC)", progress
        )
        try:  # closed on the way out of a failure too, so the error line prints last
            if spec.tuning.method == "spsa":
                prior, theta_s, losses_held = self._spsa(theta_s, frozen_s, train_x, train_y, bar)  # fmt: skip
            else:
                prior = None
                theta_s, losses_held = _cma(spec, backend, self.compiled, frozen_s, train_x, train_y, data_h, bar)  # fmt: skip
        finally:
            bar.close()
        if not losses_held and prior is None:
            return None, theta_s
        collected = backend.at(do, _all_losses, prior, *losses_held)
        return collected, theta_s

    def _spsa(self, theta_s, frozen_s, train_x, train_y, bar):
        spec, backend = self.spec, self.backend
        do, every = spec.parties.data_owner, spec.checkpoint.every
        schedule = make_schedule(spec.tuning.schedule_config())
        theta_like = self.programs.problem.trainable
        prior = None
        if self.resume_step:
            theta_s = self._load(theta_like)
            if spec.parties.reveal_loss:
                prior = backend.at(do, _checkpoint_losses, str(self.out_dir), do, self.resume_step)
            bar.skip(self.resume_step)
        losses_held = []
        plan = self.programs.privacy
        step_program = self.compiled[self.programs.step.name]
        for i in range(self.resume_step, spec.tuning.steps):
            z = build.step_directions(spec, i, theta_like)  # public
            lr = np.float32(schedule(i))  # public
            if plan is None:
                c = i % len(train_x)
                theta_s, loss_s = backend.execute(step_program, theta_s, frozen_s, train_x[c], train_y[c], z, lr)  # fmt: skip
            else:  # the data owner's private sample and noise enter as its secrets
                from secfwt_jax.run.privacy import data_owner_draws

                draws_h = backend.at(do, data_owner_draws, self.dp_seed_h, i, plan, num_returns=3)
                pick_s, included_s, noise_s = (backend.share(h) for h in draws_h)
                theta_s, loss_s = backend.execute(step_program, theta_s, frozen_s, *train_x, *train_y, pick_s, included_s, z, noise_s, lr)  # fmt: skip
            loss = None
            if spec.parties.reveal_loss:
                held = backend.reveal_to(do, loss_s)
                losses_held.append(held)
                value = backend.local(held)
                loss = None if value is None else float(np.asarray(value))
            bar.update(backend.cost, loss, _epsilon_so_far(plan, i + 1))
            if every and (i + 1) % every == 0:
                self._save(i + 1, theta_s, prior, losses_held)
        return prior, theta_s, losses_held

    def _paths(self, step: int) -> dict[str, Path]:
        return {p: checkpoints.shares_path(self.out_dir, p, step) for p in self.spec.parties.compute}  # fmt: skip

    def _save(self, step: int, theta_s, prior, losses_held) -> None:
        """Each party writes its own shares, then its record; the data owner's record also
        holds its own losses so far. Waits until every party has written."""
        spec, backend = self.spec, self.backend
        backend.save_shares(theta_s, self._paths(step))
        facts = {"spec_hash": spec.spec_hash, "backend": backend.kind, "protocol": f"{spec.protocol.name} {spec.protocol.field}"}  # fmt: skip
        for party in spec.parties.compute:
            own = (prior, *losses_held) if party == spec.parties.data_owner else (None,)
            digest_h = self.digests.get(party)
            done = backend.at(party, _write_checkpoint, str(self.out_dir), party, step, facts, digest_h, *own)  # fmt: skip
            backend.publish(done)  # a sync point: the step is on disk at every party
        for party in spec.parties.compute:  # only then older steps go, so a party that
            # failed to write this step (a full disk) leaves every party the one before
            backend.at(party, checkpoints.prune, str(self.out_dir), party, spec.checkpoint.keep, spec.spec_hash, backend.kind)  # fmt: skip

    def _load(self, theta_like):
        return self.backend.load_shares(self._paths(self.resume_step), theta_like)


def _epsilon_so_far(plan, steps: int) -> float | None:
    """A private run's epsilon after `steps` steps, for the progress bar: computed at
    about 20 points of the run (the accountant takes a fraction of a second)."""
    if plan is None:
        return None
    every = max(1, plan.steps // 20)
    if steps % every and steps != plan.steps:
        return None
    return plan.epsilon_after(steps)


def _all_losses(prior, *losses) -> list:
    return list(prior or []) + [np.asarray(x).tolist() for x in losses]


def _input_digests(spec, backend, theta_h, frozen_h, data_h) -> dict:
    """Each owner's digest of its own private inputs, computed and kept where they live."""
    mo, do = spec.parties.model_owner, spec.parties.data_owner
    return {
        mo: backend.at(mo, checkpoints.inputs_sha256, theta_h, frozen_h),
        do: backend.at(do, lambda d: checkpoints.inputs_sha256(d.train_inputs, d.train_labels, d.eval_inputs), data_h),
    }  # fmt: skip


def _write_checkpoint(out_dir: str, party: str, step: int, facts: dict, inputs_digest, prior, *losses) -> bool:  # fmt: skip
    record = dict(facts)
    if prior is not None or losses:
        record["losses"] = _all_losses(prior, *losses)
    checkpoints.write_meta(out_dir, party, step, record, inputs_digest)
    return True


def _checkpoint_losses(out_dir: str, party: str, step: int) -> list | None:
    """The data owner's own losses up to `step`, from its own checkpoint record."""
    return checkpoints.read_meta(out_dir, party, step).get("losses")


def _cma(spec, backend, compiled, frozen_s, train_x, train_y, data_h, bar):
    """CMA-ES at the data owner: public candidates, their losses to the data owner only."""
    from secfwt_jax.tuning import cmaes

    do = spec.parties.data_owner
    cfg = spec.tuning.cma_config(spec.seed)
    dim = spec.tuning.trainable.intrinsic_dim
    es_h = backend.at(do, cmaes.start_strategy, dim, cfg)
    losses_held = []
    for g in range(spec.tuning.steps):
        candidates = backend.publish(backend.at(do, cmaes.ask, es_h))  # public by design
        k = g % len(train_x)
        (loss_s,) = backend.execute(compiled["population_loss"], {"z": candidates}, frozen_s, train_x[k], train_y[k])  # fmt: skip
        held = backend.reveal_to(do, loss_s)
        es_h = backend.at(do, cmaes.tell, es_h, candidates, held)
        losses_held.append(backend.at(do, lambda x: float(np.min(x)), held))
        value = backend.local(losses_held[-1])
        bar.update(backend.cost, value)
    best_h = backend.at(do, cmaes.solution, es_h)
    return backend.share(best_h), losses_held


__all__ = ["PRIVATE_SEED_FILE", "PrivateSeeds", "model_owner_seed", "finetune_on"]
