"""The shared three-party run (`conftest.three_party_run`) and what the tests read from it:
a test CA and party certificates (made with `cryptography`), a cluster file with TLS on
every link, the red team's probe of SPU's ports, and byte searches of each party's files.

Tests import it by module name (pytest puts this folder on sys.path), as `cluster_jobs`."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import threading
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secfwt_jax.runtime.cluster import ClusterConfig, loopback_cluster

PARTIES = ("alice", "bob", "carol")
#: The private tiny run (the data owner's Poisson sample and Gaussian noise, 3 steps) that
#: the shared three-party run launches and `test_privacy_run.py` runs in the simulator.
PRIVATE = ["tuning.privacy={clip: 1.0, noise_multiplier: 1.0}", "tuning.steps=3",
           "evaluation.mpc_examples=4", "evaluation.batch_size=4"]  # fmt: skip


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


PUSH = (
    b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)


def probe_spu_ports(ports: list[int], stop: threading.Event, seen: dict[str, list]) -> None:
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


def party_files(base: Path, party: str) -> list[Path]:
    work = base / "work"
    mine = [work / f"{party}.log", work / f"spu-{party}.log", work / f"{party}.result.json"]
    return [p for p in mine if p.is_file()] + sorted((base / "cluster" / party).rglob("*"))


def needles_of_floats(values: np.ndarray, count: int = 6) -> list[bytes]:
    """Byte patterns of secret float values: 4 consecutive float32s, and their repr."""
    flat = np.asarray(values, np.float32).ravel()
    big = flat[np.abs(flat) > 1e-3][: count + 4]
    needles = [big[i : i + 4].tobytes() for i in range(0, min(count, len(big) - 4))]
    return needles + [repr(float(x)).encode() for x in big[:count]]


def holds(files: list[Path], needles: list[bytes]) -> list[str]:
    hits = []
    for path in files:
        if path.is_file():
            blob = path.read_bytes()
            hits += [f"{path.name}: {n[:12]!r}" for n in needles if n in blob]
    return hits
