"""Fixtures shared across test files.

`three_party_run` is the one launch of the tiny preset on three SecretFlow party processes
that the default run makes: every check of a whole cluster run reads it
(`test_finetune_cluster.py`, `test_cluster_tls.py`, `test_privacy_run.py`). It runs with
everything on at once, as a privacy team would run it: mutual TLS on every link (SecretFlow's
gRPC and SPU's brpc link) with the red team's plain-text probe of SPU's ports while it runs,
and a private run (DP-SPSA) whose data owner draws its seed from the OS. The same spec and
the same two seeds in the simulator give the reference. A launch costs about 100 s on 2
cores, so the three files share one instead of making three.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# JAX's persistent compilation cache, one per test session (empty at its start): the same
# plaintext computation compiled by another test, a party process or a notebook kernel
# (each inherits the variable) is read back instead of compiled again. Measured on the tiny
# preset: a run in a warm process 21.5 s -> 17.5 s. Set before any test module imports jax.
# Under pytest-xdist the workers inherit the controller's folder (JAX writes each entry to a
# temporary file and renames it, so concurrent writers are safe) and the controller removes it.
_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if _WORKER and "SECFWT_TEST_XLA_CACHE" in os.environ:
    XLA_CACHE = Path(os.environ["SECFWT_TEST_XLA_CACHE"])
else:
    XLA_CACHE = Path(tempfile.mkdtemp(prefix="secfwt-test-xla-"))
    os.environ["SECFWT_TEST_XLA_CACHE"] = str(XLA_CACHE)
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(XLA_CACHE)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"


def pytest_sessionfinish(session, exitstatus):
    if not _WORKER:
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


# pytest-xdist (`-n 2 --dist loadgroup`, the default run): each file is one unit of work, so
# its module fixtures are built once; the three files that read the shared launch are one
# unit, so the launch is made once. Units start longest first (FIRST, measured on the
# default run), so the two workers end close together.
SHARED_LAUNCH = {"test_finetune_cluster.py", "test_cluster_tls.py", "test_privacy_run.py"}
FIRST = (  # the units over about 70 s, longest first (2026-12-07, two workers)
    "test_finetune_cluster.py", "test_finetune.py", "test_cost_bench.py",
    "test_checkpoint_resume.py", "test_secretflow_cluster.py", "test_notebooks.py",
    "test_semi2k_cluster.py", "test_mpc_equals_plaintext.py", "test_adaptation.py",
    "test_models_mpc.py",
)  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    def unit(item) -> str:
        name = item.path.name
        return "three_party_run" if name in SHARED_LAUNCH else name

    def rank(item) -> int:
        name = "test_finetune_cluster.py" if unit(item) == "three_party_run" else item.path.name
        return FIRST.index(name) if name in FIRST else len(FIRST)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(unit(item)))
    items.sort(key=rank)  # stable: the order within a file is kept


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
MODEL_OWNER_SEED = 2


@dataclass(frozen=True)
class ThreePartyRun:
    """What the shared launch left: each party's summary, its folders, the data owner's
    OS-drawn seed, the red team's probe log and the simulator's run with the same seeds."""

    spec: Any  # the private tiny spec, backend sim (the simulator's reference)
    results: dict[str, dict]
    base: Path  # <base>/cluster/<party>/ (outputs) and <base>/work/ (logs)
    cluster_file: Path  # with a tls section: every link is mutual TLS
    model_owner_seed: int
    data_owner_seed: int
    spu_ports: list[int]
    probe: dict[str, list]
    sim: dict


@pytest.fixture(scope="session")
def three_party_run(tmp_path_factory) -> ThreePartyRun:
    from cluster_evidence import PRIVATE, cluster_file, pki, probe_spu_ports

    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster_run import launch_local
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.runtime.sim_run import finetune_in_simulator

    base = tmp_path_factory.mktemp("three-party")
    cluster = cluster_file(base, pki(base / "pki"))
    overrides = [*PRIVATE, f"backend.cluster={cluster}"]
    ports = list(json.loads(cluster.read_text())["spu_ports"].values())
    stop, seen = threading.Event(), {"connected": [], "answers": []}
    probe = threading.Thread(target=probe_spu_ports, args=(ports, stop, seen), daemon=True)
    probe.start()
    try:
        results = launch_local(load_spec(TINY, overrides), str(TINY), overrides, MODEL_OWNER_SEED,
                               out_dir=base / "cluster", timeout_s=600, work_dir=base / "work")  # fmt: skip
    finally:
        stop.set()
        probe.join(10)
    spec = load_spec(TINY, PRIVATE)
    seed = int((base / "cluster" / spec.parties.data_owner / "private_seed").read_text())
    sim = finetune_in_simulator(spec, seeds=PrivateSeeds(MODEL_OWNER_SEED, seed), out_dir=base / "sim",
                                progress=False, log=lambda m: None)  # fmt: skip
    return ThreePartyRun(spec, results, base, cluster, MODEL_OWNER_SEED, seed, ports, seen, sim)
