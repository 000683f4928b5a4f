"""Visibility policy: compiled SPSA step inputs match the policy, nothing is declassified."""

from __future__ import annotations

from pathlib import Path

import jax

from secfwt_jax.compile import compiler, visibility
from secfwt_jax.compile.spec_programs import programs_of_run
from secfwt_jax.run.spec import load_spec

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _compiled_step():
    step = programs_of_run(load_spec(TINY, ["tuning.trainable={kind: bitfit}"])).step
    comp = compiler.compile_to_pphlo(step.fn, step.args, public={4, 5})
    roles = [
        r for a, r in zip(step.args, ["trainable", "frozen", "data", "labels", "directions", "step_size"], strict=True)
        for _ in jax.tree_util.tree_leaves(a)
    ] + ["constant"] * len(comp.constants)  # fmt: skip
    return comp, roles


def test_spsa_step_inputs_follow_policy_and_nothing_is_declassified():
    comp, roles = _compiled_step()
    types = compiler.pphlo_input_types(comp.pphlo_text)
    assert visibility.check_inputs(types, roles) == []
    assert visibility.find_declassifications(comp.pphlo_text) == []
    # a wrong role assignment is caught
    flipped = ["directions"] + roles[1:]
    assert visibility.check_inputs(types, flipped)


def test_checker_flags_a_leaky_program():
    comp, _ = _compiled_step()
    lines = comp.pphlo_text.splitlines()
    ret = next(i for i, ln in enumerate(lines) if ln.strip().startswith("return"))
    sig = compiler.pphlo_input_types(comp.pphlo_text)
    secret_arg = next(i for i, t in enumerate(sig) if "!pphlo.secret" in t)
    public_t = sig[secret_arg].replace("!pphlo.secret<f32>", "f32")
    leak = f"    %leak = pphlo.convert %arg{secret_arg} : ({sig[secret_arg]}) -> {public_t}"
    leaky = "\n".join(lines[:ret] + [leak] + lines[ret:])
    assert visibility.find_declassifications(leaky) == [leak.strip()]
