"""Mutual TLS on every link (SecretFlow's cross-silo gRPC and SPU's brpc link): a run over
TLS gives the simulator's result and SPU's ports answer nothing in plain text while it runs
(the shared three-party run, `conftest.three_party_run`); a party whose certificate another
CA signed is refused by every peer, with one line, before any data moves. Certificates come
from a CA made with `cryptography` (`cluster_evidence.pki`)."""

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from cluster_evidence import PARTIES, cluster_file, pki

from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster import ClusterConfig, loopback_cluster
from secfwt_jax.runtime.cluster_run import launch_local, load_theta
from secfwt_jax.runtime.launcher import PartyFailedError
from secfwt_jax.runtime.liveness import tls_refusal

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SEED = 17


def test_tls_section_is_validated_with_one_line():
    base = loopback_cluster(PARTIES, "ABY3").to_dict()
    with pytest.raises(ValueError, match=r"ClusterConfig.tls: must map exactly"):
        ClusterConfig.from_dict(base | {"tls": {"cert": "a"}})
    config = ClusterConfig.from_dict(base | {"tls": {"ca_cert": "/nope/ca.crt", "cert": "/nope/{party}.crt", "key": "k"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"ClusterConfig.tls.ca_cert: /nope/ca.crt not found \(party bob\)"):  # fmt: skip
        config.tls_paths("bob")


def _serve_once(reply: bytes | None):
    """A TCP server that answers the first connection with `reply` (None: silence)."""
    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)  # the ClientHello
            if reply is not None:
                conn.sendall(reply)
            time.sleep(1.5)

    threading.Thread(target=answer, daemon=True).start()
    return server


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None], ids=["plaintext", "silent"])  # fmt: skip
def test_a_peer_without_tls_is_refused(tmp_path, reply):
    tls = {k: v.replace("{party}", "alice") for k, v in pki(tmp_path / "pki").items()}
    server = _serve_once(reply)
    with server:
        why = tls_refusal("127.0.0.1", server.getsockname()[1], tls, timeout_s=2.0, handshake_s=1.0)
    assert why, "a peer that speaks no TLS was accepted"


@pytest.mark.cluster
def test_a_run_over_mutual_tls_gives_the_simulators_result(three_party_run):
    run = three_party_run
    assert set(json.loads(run.cluster_file.read_text())["tls"]) == {"ca_cert", "cert", "key"}
    # the SPU ports were up while the run went on, and none served a message without TLS
    assert set(run.probe["connected"]) == set(run.spu_ports)
    assert not [a for a in run.probe["answers"] if a.startswith(b"HTTP")], run.probe["answers"][:3]
    tuned = load_theta(run.results["alice"]["tuned_params"]["path"])
    assert relative_gap(tuned, load_theta(run.sim["tuned_params"]["path"])) < 1e-3


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_party_with_another_cas_certificate_is_refused_before_any_data_moves(tmp_path):
    path = cluster_file(tmp_path, pki(tmp_path / "pki", rogue="carol"))
    overrides = [f"backend.cluster={path}"]
    spec = load_spec(TINY, overrides)
    start = time.monotonic()
    with pytest.raises(PartyFailedError) as info:
        launch_local(spec, str(TINY), overrides, SEED, out_dir=tmp_path / "out", timeout_s=200,
                     work_dir=tmp_path / "work")  # fmt: skip
    assert time.monotonic() - start < 90
    first = str(info.value).splitlines()[0]
    assert "mutual TLS with peer" in first
    for party in ("alice", "bob"):  # the honest parties name the rogue one
        log = (tmp_path / "work" / f"{party}.log").read_text(errors="replace")
        assert "mutual TLS with peer carol" in log, party
    assert not list((tmp_path / "out").rglob("*.json")) and not list(
        (tmp_path / "out").rglob("*.npz")
    )
