"""Visibility policy: compiled SPSA step inputs match the policy, nothing is declassified."""

from __future__ import annotations

import jax
import numpy as np

from secfwt_jax.compile import simulator, visibility
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.runtime.demo import DEMO_MODEL, DemoConfig, make_step, synthetic_batch
from secfwt_jax.tuning import spsa, trainable


def _compiled_step():
    clf = Classifier(DEMO_MODEL, HeadConfig(num_labels=2))
    theta, frozen = trainable.partition(clf.init(0), lambda p: "embeddings" not in p)
    batch = synthetic_batch(DemoConfig(), DEMO_MODEL.vocab_size)
    z = spsa.directions(0, 0, theta)
    args = (theta, frozen, batch, z, np.float32(1e-3))
    comp = simulator.compile_to_pphlo(
        make_step(clf, spsa.SpsaConfig(eps=1e-2)), args, public={3, 4}
    )
    roles = [
        r for a, r in zip(args, ["trainable", "frozen", "batch", "directions", "step_size"], strict=False)
        for _ in jax.tree_util.tree_leaves(a)
    ] + ["constant"] * len(comp.constants)  # fmt: skip
    return comp, roles


def test_spsa_step_inputs_follow_policy_and_nothing_is_declassified():
    comp, roles = _compiled_step()
    types = simulator.pphlo_input_types(comp.pphlo_text)
    assert visibility.check_inputs(types, roles) == []
    assert visibility.find_declassifications(comp.pphlo_text) == []
    # a wrong role assignment is caught
    flipped = ["directions"] + roles[1:]
    assert visibility.check_inputs(types, flipped)


def test_checker_flags_a_leaky_program():
    comp, _ = _compiled_step()
    lines = comp.pphlo_text.splitlines()
    ret = next(i for i, ln in enumerate(lines) if ln.strip().startswith("return"))
    sig = simulator.pphlo_input_types(comp.pphlo_text)
    secret_arg = next(i for i, t in enumerate(sig) if "!pphlo.secret" in t)
    public_t = sig[secret_arg].replace("!pphlo.secret<f32>", "f32")
    leak = f"    %leak = pphlo.convert %arg{secret_arg} : ({sig[secret_arg]}) -> {public_t}"
    leaky = "\n".join(lines[:ret] + [leak] + lines[ret:])
    assert visibility.find_declassifications(leaky) == [leak.strip()]
