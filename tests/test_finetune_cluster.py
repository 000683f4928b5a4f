"""A run spec on three SecretFlow parties (loopback processes) equals the simulator, and no
party's files or logs hold another party's secrets. The run is the shared three-party run
(`conftest.three_party_run`: the tiny preset, private, over mutual TLS), read here for what
any cluster run must show."""

import stat
from pathlib import Path

import numpy as np
import pytest
from cluster_evidence import holds, needles_of_floats, party_files

from secfwt_jax.data.sampling import k_shot_splits
from secfwt_jax.run import build
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.runtime.cluster_run import load_theta

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_three_parties_give_the_simulators_tuned_parameters(three_party_run):
    run = three_party_run
    cluster_theta = load_theta(run.results["alice"]["tuned_params"]["path"])
    assert relative_gap(cluster_theta, load_theta(run.sim["tuned_params"]["path"])) < 1e-3
    np.testing.assert_allclose(run.results["bob"]["losses"], run.sim["mpc"]["losses"], atol=1e-2)
    assert run.results["bob"]["accuracy_after"] == run.sim["mpc"]["accuracy_after"]


def test_every_backend_reports_the_same_program_keys(three_party_run):
    keys = {k: v["key"] for k, v in three_party_run.sim["programs"].items()}
    assert all(r["programs"] == keys for r in three_party_run.results.values())


def test_only_the_data_owner_learns_losses_and_accuracy(three_party_run):
    results = three_party_run.results
    assert results["bob"]["losses"] and results["bob"]["accuracy_after"] is not None
    for party in ("alice", "carol"):
        assert results[party]["losses"] is None and results[party]["accuracy_after"] is None
    assert results["alice"]["tuned_params"] and not results["bob"]["tuned_params"]


def test_every_file_a_party_writes_is_owner_only(three_party_run):
    for party in ("alice", "bob", "carol"):
        # every file but SPU's own spdlog file (spu-<party>.log, opened by SPU, not by us)
        files = [p for p in party_files(three_party_run.base, party) if p.is_file() and not p.name.startswith("spu-")]  # fmt: skip
        assert any(p.name == f"{party}.log" for p in files), party
        assert any(p.name == "report.json" for p in files), party
        loose = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o600}  # fmt: skip
        assert loose == {}, party


def test_no_party_holds_another_partys_secrets(three_party_run):
    run = three_party_run
    spec, base = run.spec, run.base
    tuned = load_theta(run.results["alice"]["tuned_params"]["path"])
    tuned_needles = [n for v in tuned.values() for n in needles_of_floats(v, 2)]
    from secfwt_jax.models.checkpoint import load_tokenizer

    head = build.head_config(spec, load_tokenizer(spec.resolve(spec.model.tokenizer_path)))
    _, params = build.load_model(spec, head, run.model_owner_seed, log=lambda m: None)
    weight_needles = needles_of_floats(params["bert"]["embeddings"]["word_embeddings"]["embedding"][1000:1010])  # fmt: skip
    data = build.load_data(spec)
    splits = k_shot_splits(data, spec.data.k, spec.data.seed, dev_k=0, test_size=spec.data.test_size)  # fmt: skip
    text_needles = [t[:30].encode() for t in splits.train.texts if len(t) >= 30]

    assert holds(party_files(base, "alice"), tuned_needles), "positive control: the receiver holds theta"  # fmt: skip
    for party in ("bob", "carol"):
        assert not holds(party_files(base, party), tuned_needles + weight_needles), party
    for party in ("alice", "carol"):
        assert not holds(party_files(base, party), text_needles), party
    assert not (base / "work" / "alice.private_seed").exists()


def test_parties_with_different_specs_stop_at_the_handshake_naming_it(tmp_path):
    import subprocess
    import sys
    import time

    import yaml

    from secfwt_jax.runtime.cluster import loopback_cluster
    from secfwt_jax.runtime.launcher import offline_env

    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(loopback_cluster().to_dict()))
    common = ["--set", f"data.path={ROOT / 'tests' / 'data' / 'sentiment_small.csv'}"]
    procs = {}
    for party in ("alice", "bob", "carol"):
        extra = ["--set", "tuning.steps=4"] if party == "carol" else []  # carol's copy differs
        seed = ["--private-seed", "1"] if party == "alice" else []
        cmd = [sys.executable, "-m", "secfwt_jax.runtime.cli", "party", str(TINY), "--party", party,
               "--cluster", str(cluster), "--out", str(tmp_path / "out"), *common, *extra, *seed]  # fmt: skip
        log = open(tmp_path / f"{party}.log", "wb")  # noqa: SIM115 - closed below
        procs[party] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=offline_env(),
                                         cwd=tmp_path, start_new_session=True), log)  # fmt: skip
    deadline = time.monotonic() + 240
    try:
        while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for p, log in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    for party, (p, _) in procs.items():
        text = (tmp_path / f"{party}.log").read_text(errors="replace")
        assert p.returncode == 2, (party, text[-2000:])
        assert "secfwt: error: handshake: carol and alice differ in spec_hash" in text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.npz"))
