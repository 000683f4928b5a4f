"""Mutual TLS on every link (SecretFlow's cross-silo gRPC and SPU's brpc link): a job over
TLS gives the simulator's result; a party whose certificate another CA signed is refused
by every peer, with one line, before any data moves. Certificates come from a CA this test
makes with `cryptography`."""

import datetime
import ipaddress
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster import ClusterConfig, loopback_cluster
from secfwt_jax.runtime.cluster_run import launch_local, load_theta
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.launcher import PartyFailedError
from secfwt_jax.runtime.liveness import tls_refusal
from secfwt_jax.runtime.sim_run import finetune_in_simulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PARTIES = ("alice", "bob", "carol")
SEED = 17


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder(subject: str, issuer: str, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def make_ca(name: str):
    key = _key()
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_party_cert(ca, party: str):
    ca_key, ca_cert = ca
    key = _key()
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])  # fmt: skip
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])  # fmt: skip
    cert = (
        _builder(
            party,
            ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            key.public_key(),
        )  # fmt: skip
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(usage, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pair(folder: Path, stem: str, key, cert) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # fmt: skip
    (folder / f"{stem}.key").write_bytes(pem)
    (folder / f"{stem}.key").chmod(0o600)


def pki(folder: Path, rogue: str | None = None) -> dict[str, str]:
    """ca.crt and <party>.crt/.key; `rogue`'s certificate is signed by another CA."""
    ca, other = make_ca("secfwt-test-ca"), make_ca("another-ca")
    (folder).mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    for party in PARTIES:
        write_pair(folder, party, *make_party_cert(other if party == rogue else ca, party))
    return {"ca_cert": str(folder / "ca.crt"), "cert": str(folder / "{party}.crt"), "key": str(folder / "{party}.key")}  # fmt: skip


def cluster_file(folder: Path, tls: dict[str, str]) -> Path:
    config = loopback_cluster(PARTIES, "ABY3").to_dict() | {"tls": tls}
    ClusterConfig.from_dict(config)  # valid
    path = folder / "cluster.json"
    path.write_text(json.dumps(config))
    return path


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


PUSH = (
    b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


def _probe_spu_ports(ports: list[int], stop: threading.Event, seen: dict[str, list]) -> None:
    """The red team's probe, every 0.3 s while the job runs: a plain-text POST to each
    party's SPU port. Records which ports accepted a TCP connection and what they answered."""
    while not stop.is_set():
        for port in ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                    seen["connected"].append(port)
                    conn.settimeout(3)
                    conn.sendall(PUSH)
                    seen["answers"].append(conn.recv(4096))
            except OSError:
                pass
        stop.wait(0.3)


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_a_job_over_mutual_tls_gives_the_simulators_result(tmp_path):
    path = cluster_file(tmp_path, pki(tmp_path / "pki"))
    overrides = [f"backend.cluster={path}"]
    spec = load_spec(TINY, overrides)
    ports = list(json.loads(path.read_text())["spu_ports"].values())
    stop, seen = threading.Event(), {"connected": [], "answers": []}
    probe = threading.Thread(target=_probe_spu_ports, args=(ports, stop, seen), daemon=True)
    probe.start()
    try:
        results = launch_local(spec, str(TINY), overrides, SEED, out_dir=tmp_path / "out", timeout_s=500,
                               work_dir=tmp_path / "work")  # fmt: skip
    finally:
        stop.set()
        probe.join(10)
    # the SPU ports were up while the job ran, and none served a message without TLS
    assert set(seen["connected"]) == set(ports)
    assert not [a for a in seen["answers"] if a.startswith(b"HTTP")], seen["answers"][:3]
    sim = finetune_in_simulator(load_spec(TINY), seeds=PrivateSeeds(SEED), out_dir=tmp_path / "sim", progress=False)  # fmt: skip
    tuned = load_theta(results["alice"]["tuned_params"]["path"])
    assert relative_gap(tuned, load_theta(sim["tuned_params"]["path"])) < 1e-3


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
