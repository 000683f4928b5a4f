"""A private run (`tuning.privacy`) through `secfwt finetune`: MPC equals the plaintext
mechanism given the same data-owner draws, the report carries the accountant's epsilon,
and on three SecretFlow parties the sample and the noise never leave the data owner, whose
seed (not the public one) moves theta."""

from pathlib import Path

import numpy as np
import pytest
from cluster_evidence import PRIVATE

from secfwt_jax.run.privacy import data_owner_draws, privacy_plan
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import SpecError, load_spec
from secfwt_jax.runtime.cluster_run import load_theta
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.sim_run import finetune_in_simulator
from secfwt_jax.tuning import privacy

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def private_spec(*extra: str):
    return load_spec(TINY, [*PRIVATE, *extra])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    spec = private_spec("evaluation.plaintext_reference=true")
    out = tmp_path_factory.mktemp("dp-first")
    return spec, finetune_in_simulator(spec, seeds=PrivateSeeds(2, 5), out_dir=out, progress=False, log=lambda m: None)  # fmt: skip


def test_mpc_equals_the_plaintext_mechanism_given_the_same_draws(first):
    spec, report = first
    ref = report["plaintext_reference"]
    assert report["programs"].keys() >= {"dp_spsa_step", "trunk"}
    assert ref["max_loss_gap"] < 1e-3
    assert ref["relative_param_gap"] < 1e-3


def test_the_report_carries_the_accountants_epsilon(first):
    spec, report = first
    p = report["privacy"]
    n = p["num_rows"]
    assert n == 16 and p["rate"] == pytest.approx(spec.tuning.batch_size / n)
    assert p["delta"] == pytest.approx(n**-1.1)
    assert p["epsilon"] == pytest.approx(privacy.epsilon_spent(1.0, p["rate"], 3, p["delta"]))
    assert p["max_rows"] >= p["expected_batch"] and p["total_delta"] <= 1.1 * p["delta"]


@pytest.mark.slow  # two tiny runs (about 2 min alone); the resume machinery itself is in the default run (test_checkpoint_resume.py)
def test_a_resumed_private_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    """The data owner's seed is drawn once and kept in its folder, and each step's sample
    and noise are a function of (that seed, step): a resumed run redraws exactly the
    steps it has not done, and ends where the uninterrupted run ends."""
    from secfwt_jax.run import checkpoints

    spec = private_spec("tuning.steps=4", "checkpoint.every=1", "checkpoint.keep=10")
    quiet = {"progress": False, "log": lambda m: None}
    whole = finetune_in_simulator(
        spec, out_dir=tmp_path, **quiet
    )  # both owners draw their own seeds
    final = load_theta(whole["tuned_params"]["path"])
    for step in (3, 4):  # the model owner lost its newest checkpoints: the common step is 2
        checkpoints.meta_path(tmp_path, spec.parties.model_owner, step).unlink()
    resumed = finetune_in_simulator(spec, out_dir=tmp_path, resume=True, **quiet)
    assert resumed["resumed_from_step"] == 2
    assert relative_gap(load_theta(resumed["tuned_params"]["path"]), final) < 1e-3
    np.testing.assert_allclose(resumed["mpc"]["losses"], whole["mpc"]["losses"], atol=1e-2)
    assert resumed["privacy"]["epsilon"] == whole["privacy"]["epsilon"]


def test_a_target_epsilon_calibrates_the_noise():
    spec = private_spec(
        "tuning.privacy={clip: 0.5, epsilon: 4.0, delta: 1.0e-3}", "tuning.steps=20"
    )
    plan = privacy_plan(spec, 16)
    assert plan.epsilon == pytest.approx(4.0, abs=1e-2)
    assert plan.epsilon_after(10) < plan.epsilon
    pick, included, noise = data_owner_draws(7, 0, plan)
    assert pick.shape == (plan.max_rows, 16) and np.all(pick.sum(1) == 1) and noise.shape == (1,)
    again = data_owner_draws(7, 0, plan)
    assert all(np.array_equal(x, y) for x, y in zip((pick, included, noise), again, strict=True))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["tuning.method=cma", "tuning.trainable={kind: prompt, intrinsic_dim: 4}"],
            "tuning.privacy: CMA-ES candidates are public",
        ),  # fmt: skip
        (
            ["tuning.trainable={kind: lora, lora_rank: 2}"],
            "tuning.privacy: needs trainable.cache_trunk",
        ),  # fmt: skip
        (
            ["tuning.privacy={clip: 1.0}"],
            "^tuning.privacy: give exactly one of epsilon and noise_multiplier$",
        ),  # fmt: skip
        (
            ["tuning.privacy={clip: 0, epsilon: 1.0}"],
            "^tuning.privacy.clip: must be positive, got 0.0$",
        ),
    ],
)
def test_a_private_spec_that_cannot_hold_is_refused_with_one_line(override, message):
    with pytest.raises(SpecError, match=message):
        private_spec(*override)


@pytest.mark.cluster
def test_on_three_parties_the_sample_and_noise_stay_with_the_data_owner(first, three_party_run):
    """The shared three-party run is this private spec (`conftest.three_party_run`). The data
    owner drew its seed from the OS; the parties' theta equals the simulator's with that
    seed and differs from the run with another data-owner seed (the same public seed and
    model), and no file or log of the other parties holds the seed or the noise."""
    from cluster_evidence import holds, needles_of_floats, party_files

    run = three_party_run
    spec, results, seed = run.spec, run.results, run.data_owner_seed
    assert spec.spec_hash == private_spec().spec_hash  # the shared run is this file's spec
    assert results["bob"]["privacy"]["epsilon"] == pytest.approx(results["alice"]["privacy"]["epsilon"])  # fmt: skip
    assert results["bob"]["privacy"]["epsilon"] == pytest.approx(first[1]["privacy"]["epsilon"])
    theta = load_theta(results["alice"]["tuned_params"]["path"])
    assert relative_gap(theta, load_theta(run.sim["tuned_params"]["path"])) < 1e-3
    assert seed != 5 and relative_gap(theta, load_theta(first[1]["tuned_params"]["path"])) > 1e-3
    plan = privacy_plan(spec, 16)
    noise = np.concatenate([data_owner_draws(seed, i, plan)[2] for i in range(3)])
    needles = [str(seed).encode()] + [repr(float(x)).encode() for x in noise] + needles_of_floats(noise, 1)  # fmt: skip
    assert holds(party_files(run.base, "bob"), [str(seed).encode()]), "positive control"
    for party in ("alice", "carol"):
        assert not holds(party_files(run.base, party), needles), party
