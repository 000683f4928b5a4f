"""A SEMI2K run spec on two SecretFlow party processes equals the simulator, with SEMI2K's
openings cached (`compile/openings.py`) and RFA's sin/cos in the order that reuses them:
the same compiled program on SecretFlow's SPU runtime as in the simulator, and no party
keeps SPU's cache folder after the run (about 100 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from secfwt_jax.compile import protocols
from secfwt_jax.compile.precision import CACHE_OPENINGS
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster_run import launch_local, load_theta
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.sim_run import finetune_in_simulator

pytestmark = pytest.mark.cluster

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SEMI2K = ["protocol.name=SEMI2K", "parties.compute=[alice, bob]", "protocol.allow_insecure_beaver=true",  # fmt: skip
          "tuning.steps=3", "evaluation.mpc_examples=4", "evaluation.batch_size=4"]  # fmt: skip


def test_two_semi2k_parties_with_cached_openings_give_the_simulators_tuned_parameters(tmp_path):
    spec = load_spec(TINY, SEMI2K)
    assert spec.model.attention.trig_schedule == "reused"
    assert CACHE_OPENINGS in protocols.preset_of(spec).rewrites
    results = launch_local(spec, str(TINY), SEMI2K, 2, out_dir=tmp_path / "cluster", timeout_s=600,
                           work_dir=tmp_path / "work")  # fmt: skip
    sim = finetune_in_simulator(spec, seeds=PrivateSeeds(2), out_dir=tmp_path / "sim", progress=False, log=lambda m: None)  # fmt: skip
    theta = load_theta(results["alice"]["tuned_params"]["path"])
    assert relative_gap(theta, load_theta(sim["tuned_params"]["path"])) < 1e-3
    assert results["bob"]["accuracy_after"] == sim["mpc"]["accuracy_after"]
    assert not list(tmp_path.rglob("BeaverCache.*")), "a party left SPU's cache folder behind"
