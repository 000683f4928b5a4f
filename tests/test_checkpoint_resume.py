"""Checkpoints on the simulator: each party writes only its own shares, atomically; a run
resumed from a checkpoint ends where the uninterrupted run ends."""

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secfwt_jax.run import checkpoints
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import SpecError, load_spec
from secfwt_jax.runtime.cluster_run import load_theta
from secfwt_jax.runtime.finetune import PRIVATE_SEED_FILE, PrivateSeeds
from secfwt_jax.runtime.sim_run import finetune_in_simulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SEED = 5
STEPS = 4
OVERRIDES = [f"tuning.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=10"]
PARTIES = ("alice", "bob", "carol")


def test_common_step_is_the_newest_step_every_party_holds():
    assert checkpoints.common_step({"a": [1, 2, 3], "b": [2, 3], "c": [1, 2]}) == 2
    assert checkpoints.common_step({"a": [1], "b": []}) == 0


def test_held_steps_ignore_other_specs_incomplete_steps_and_junk(tmp_path):
    for step, spec_hash in ((1, "h"), (2, "h"), (3, "other"), (4, "h")):
        checkpoints.shares_path(tmp_path, "a", step).parent.mkdir(parents=True, exist_ok=True)
        checkpoints.shares_path(tmp_path, "a", step).write_bytes(b"x")
        checkpoints.write_meta(tmp_path, "a", step, {"spec_hash": spec_hash, "backend": "sim"})
    checkpoints.shares_path(tmp_path, "a", 4).unlink()  # a record without its shares
    checkpoints.meta_path(tmp_path, "a", 5).write_text("{not json")
    assert checkpoints.held_steps(tmp_path, "a", "h", "sim") == [1, 2]
    assert checkpoints.held_steps(tmp_path, "a", "h", "cluster") == []
    checkpoints.prune(tmp_path, "a", 1, "h", "sim")
    assert checkpoints.held_steps(tmp_path, "a", "h", "sim") == [2]


@pytest.mark.parametrize("damage", ["truncate", "flip one bit", "replace"])
def test_a_step_whose_shares_do_not_match_their_digest_is_named_and_not_held(damage, tmp_path):
    for step in (1, 2):
        checkpoints.shares_path(tmp_path, "a", step).parent.mkdir(parents=True, exist_ok=True)
        checkpoints.shares_path(tmp_path, "a", step).write_bytes(bytes(range(200)))
        checkpoints.write_meta(tmp_path, "a", step, {"spec_hash": "h", "backend": "sim"})
    path = checkpoints.shares_path(tmp_path, "a", 2)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        del blob[100:]
    elif damage == "flip one bit":
        blob[57] ^= 0x10
    else:
        blob = bytearray(b"a valid file, but another one")
    path.write_bytes(bytes(blob))
    lines = []
    assert checkpoints.held_steps(tmp_path, "a", "h", "sim", log=lines.append) == [1]
    assert len(lines) == 1 and str(path) in lines[0] and "step 2 not used" in lines[0]


def test_cma_runs_refuse_checkpoints():
    cma = ["tuning.method=cma", "tuning.trainable={kind: prompt, prompt_length: 2, intrinsic_dim: 6}"]  # fmt: skip
    with pytest.raises(SpecError, match="checkpoint.every"):
        load_spec(TINY, [*cma, "checkpoint.every=2"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    spec = load_spec(TINY, OVERRIDES)
    report = finetune_in_simulator(spec, out_dir=out, progress=False, cache_dir=_cache_of(out))  # the model owner draws its seed  # fmt: skip
    return spec, report, out


def _cache_of(out: Path) -> Path:
    """The compile cache the uninterrupted run filled (beside its output folder)."""
    return out.with_name(out.name + "-cache")


def test_the_model_owner_draws_128_bits_and_keeps_them_owner_only(uninterrupted):
    spec, _, out = uninterrupted
    seed_file = out / spec.parties.model_owner / PRIVATE_SEED_FILE
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    # 128 bits from the OS: below 2^100 with probability 2^-28 (a 31-bit seed fails here)
    assert int(seed_file.read_text()).bit_length() > 100


def test_every_file_of_the_run_is_owner_only(uninterrupted):
    _, _, out = uninterrupted
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"report.json", "curves.png", "step-000001.json", "step-000001.shares"} <= names
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o600} == {}  # fmt: skip


def test_each_party_writes_only_its_own_shares_every_step(uninterrupted):
    spec, report, out = uninterrupted
    for party in PARTIES:
        assert checkpoints.held_steps(out, party, spec.spec_hash, "sim") == list(range(1, STEPS + 1))  # fmt: skip
        meta = checkpoints.read_meta(out, party, 2)
        assert meta["spec_hash"] == spec.spec_hash and meta["step"] == 2
        assert ("losses" in meta) == (party == spec.parties.data_owner)  # the owner's own losses
    assert len(checkpoints.read_meta(out, "bob", 2)["losses"]) == 2
    # one party's shares alone are not the parameters: no two adjacent float32 values of
    # theta (8-byte needles; a 4-byte one matches a ~136 kB random blob by chance ~1e-3)
    theta = load_theta(report["tuned_params"]["path"])
    last = {p: checkpoints.shares_path(out, p, STEPS).read_bytes() for p in PARTIES}
    flat = [np.asarray(leaf, np.float32).reshape(-1)[:9] for leaf in theta.values()]
    needles = [f[i : i + 2].tobytes() for f in flat for i in range(len(f) - 1) if f[i : i + 2].any()]  # fmt: skip
    assert needles
    for party, blob in last.items():
        assert not any(n in blob for n in needles), party
    assert not list(out.rglob("*.tmp"))


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(uninterrupted, tmp_path, capsys):
    spec, report, out = uninterrupted
    final = load_theta(report["tuned_params"]["path"])
    # lose the newest checkpoints at one party: the common step is then 2
    for step in (3, 4):
        checkpoints.meta_path(out, "carol", step).unlink()
    # no seed given: the model owner reads the one it saved, so the inline weights match
    resumed = finetune_in_simulator(spec, out_dir=out, progress=False, resume=True)
    assert resumed["resumed_from_step"] == 2
    assert relative_gap(load_theta(resumed["tuned_params"]["path"]), final) < 1e-3
    np.testing.assert_allclose(resumed["mpc"]["losses"], report["mpc"]["losses"], atol=1e-2)
    assert len(resumed["mpc"]["losses"]) == STEPS
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 2


def test_a_damaged_share_file_falls_back_to_the_newest_intact_step(uninterrupted, tmp_path):
    """A flipped bit in one party's newest shares (a valid file) and a truncated file at
    another: both are named, and the run resumes from the newest step all hold intact."""
    spec, report, out = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    flipped = checkpoints.shares_path(copy, "bob", 4)
    blob = bytearray(flipped.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    flipped.write_bytes(bytes(blob))
    truncated = checkpoints.shares_path(copy, "alice", 3)
    truncated.write_bytes(truncated.read_bytes()[:100])
    lines = []
    resumed = finetune_in_simulator(
        spec, out_dir=copy, progress=False, resume=True, log=lines.append
    )
    assert resumed["resumed_from_step"] == 2
    named = [line for line in lines if "does not match the digest" in line]
    assert any(str(flipped) in line for line in named) and any(str(truncated) in line for line in named)  # fmt: skip
    final = load_theta(report["tuned_params"]["path"])
    assert relative_gap(load_theta(resumed["tuned_params"]["path"]), final) < 1e-3


def test_resume_with_another_private_seed_is_refused_before_any_work(uninterrupted, tmp_path):
    """The model owner drew its seed; resuming with another one would mix two models."""
    spec, _, out = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as info:
        finetune_in_simulator(
            spec, seeds=PrivateSeeds(SEED), out_dir=copy, progress=False, resume=True
        )
    message = str(info.value)
    assert "\n" not in message and "other private inputs at alice" in message
    assert str(checkpoints.meta_path(copy, "alice", STEPS)) in message
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # nothing lost


def test_a_write_that_fails_mid_run_is_one_line_naming_the_file_and_leaves_no_part(uninterrupted, tmp_path):  # fmt: skip
    """A file-size limit below one share file (what a full disk does to the same write):
    the first checkpoint fails; one line names it, exit 1, and no temporary file is left.
    The programs come from the compile cache the uninterrupted run filled."""
    _, _, filled = uninterrupted
    out = tmp_path / "run"
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "from secfwt_jax.runtime.cli import main\n"
        f"sys.exit(main(['finetune', {str(TINY)!r}, '--out', {str(out)!r}, '--private-seed', '3', "
        f"'--cache-dir', {str(_cache_of(filled))!r}, "
        + ", ".join(f"'--set', {o!r}" for o in OVERRIDES)
        + "]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)  # fmt: skip
    tail = done.stderr.rsplit("\r", 1)[-1]  # after the progress bar's last redraw
    lines = [line for line in tail.splitlines() if line.startswith("secfwt:")]
    assert done.returncode == 1, done.stderr[-2000:]
    shares = checkpoints.shares_path(out, "alice", 1)
    assert lines == [f"secfwt: error: {shares}: cannot write it (File too large); nothing of it was kept and any earlier file there is unchanged"]  # fmt: skip
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != PRIVATE_SEED_FILE]


def test_resume_with_another_spec_starts_afresh_and_says_so(uninterrupted, tmp_path):
    _, _, out = uninterrupted
    other = load_spec(TINY, ["tuning.steps=1", "checkpoint.every=1"])
    lines = []
    report = finetune_in_simulator(other, seeds=PrivateSeeds(SEED), out_dir=tmp_path / "o", progress=False,
                     resume=True, log=lines.append)  # fmt: skip
    assert report["resumed_from_step"] == 0
    assert any("--resume: no checkpoint" in line for line in lines)


def test_result_kept_as_shares_is_written_by_each_party_for_itself(tmp_path):
    spec = load_spec(TINY, ["tuning.steps=1", "parties.result_to=shares"])
    report = finetune_in_simulator(spec, seeds=PrivateSeeds(SEED), out_dir=tmp_path, progress=False)
    assert "tuned_params" not in report and not list(tmp_path.rglob("tuned_params.npz"))
    assert sorted(report["tuned_shares"]) == list(PARTIES)
    assert all(Path(p).is_file() for p in report["tuned_shares"].values())
