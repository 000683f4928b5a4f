"""SPU's link port under the cluster file's `tls`: only a peer holding a certificate the
cluster's CA signed reaches SPU (runtime/tls_front.py).

The links are real: secretflow's own `SPURuntime` builds spu's brpc link from
`ClusterConfig.spu_cluster_def`, as a party process does, with each party's SPU server
behind its front. The probes are the red team's: a plain-text HTTP POST to the link's Push
method, a TLS client with no certificate, and one whose certificate another CA signed, each
at the public port. The same POST at SPU's own (loopback) port is answered 200, which is the
hole the front closes, and a peer with the right certificate is answered through the front,
so a refusal means the front refused it.
"""

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cluster_evidence import make_ca, make_party_cert, pki, write_pair

from secfwt_jax.runtime.cluster import loopback_cluster
from secfwt_jax.runtime.tls_front import spu_front

PUSH = (
    b"POST /org.interconnection.link.ReceiverService/Push HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
PARTIES = ("alice", "bob")


def _answer(conn: socket.socket) -> bytes:
    """What the server answers to PUSH (b"" when it drops the connection)."""
    conn.settimeout(5)
    try:
        conn.sendall(PUSH)
        return conn.recv(4096)
    except (OSError, ssl.SSLError):
        return b""


def _plain_push(address) -> bytes:
    with socket.create_connection(address, timeout=5) as conn:
        return _answer(conn)


def _tls_push(address, ca: str, cert: tuple[str, str] | None) -> bytes:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(*cert)
    try:
        with socket.create_connection(address, timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=address[0]) as conn:
                return _answer(conn)
    except (OSError, ssl.SSLError):
        return b""


@pytest.fixture(scope="module")
def links(tmp_path_factory):
    """Two parties' real SPU links over mutual TLS, each behind its front."""
    from secretflow.device.device.spu import SPURuntime

    folder = tmp_path_factory.mktemp("pki")
    tls = pki(folder)
    write_pair(folder, "outsider", *make_party_cert(make_ca("another-ca"), "outsider"))
    cluster = loopback_cluster(PARTIES, "SEMI2K")
    paths = {p: {k: v.replace("{party}", p) for k, v in tls.items()} for p in PARTIES}
    fronts, internal, runtimes = {}, {}, {}
    for p in PARTIES:
        fronts[p] = spu_front((cluster.host, cluster.spu_ports[p]), paths[p])
        internal[p] = fronts[p].__enter__()

    def build(rank: int, party: str) -> None:
        cluster_def = cluster.spu_cluster_def(party, internal[party])
        for node in cluster_def["nodes"]:  # spu_cluster_def puts the TLS options on our node
            node.setdefault("tls_opts", None)
        node = cluster_def["nodes"][rank]
        opts = {"certificate_path": paths[party]["cert"], "private_key_path": paths[party]["key"],
                "ca_file_path": tls["ca_cert"], "verify_depth": 1}  # fmt: skip
        node["tls_opts"] = {"server_ssl_opts": opts, "client_ssl_opts": dict(opts)}
        runtimes[party] = SPURuntime(rank, cluster_def)

    threads = [threading.Thread(target=build, args=(r, p)) for r, p in enumerate(PARTIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(runtimes) == set(PARTIES), "the links did not come up through the fronts"
    yield {"cluster": cluster, "internal": internal, "runtimes": runtimes, "folder": Path(folder),
           "ca": tls["ca_cert"]}  # fmt: skip
    for p in PARTIES:
        fronts[p].__exit__(None, None, None)


def test_parties_exchange_data_through_the_fronts_both_ways_at_once(links):
    alice, bob = links["runtimes"]["alice"].link, links["runtimes"]["bob"].link
    alice.send(1, "from alice")
    assert bob.recv(0) == b"from alice"
    # large messages in both directions at the same time (as MPC rounds do)
    big = {"alice": "a" * (8 << 20), "bob": "b" * (8 << 20)}
    got = {}
    senders = [threading.Thread(target=alice.send, args=(1, big["alice"])),
               threading.Thread(target=bob.send, args=(0, big["bob"]))]  # fmt: skip
    for t in senders:
        t.start()
    got["bob"], got["alice"] = bob.recv(0), alice.recv(1)
    for t in senders:
        t.join(60)
    assert got["bob"] == big["alice"].encode() and got["alice"] == big["bob"].encode()


def test_spu_itself_serves_a_plaintext_push_which_is_why_the_front_exists(links):
    assert _plain_push(links["internal"]["alice"]).startswith(b"HTTP/1.1 200")


def test_a_peer_with_the_cas_certificate_is_served_through_the_front(links):
    public = ("127.0.0.1", links["cluster"].spu_ports["alice"])
    bob = (str(links["folder"] / "bob.crt"), str(links["folder"] / "bob.key"))
    assert _tls_push(public, links["ca"], bob).startswith(b"HTTP/1.1 200")


def test_a_plaintext_push_without_a_certificate_is_refused(links):
    public = ("127.0.0.1", links["cluster"].spu_ports["alice"])
    assert _plain_push(public) == b""


def test_a_tls_peer_without_a_certificate_is_refused(links):
    public = ("127.0.0.1", links["cluster"].spu_ports["alice"])
    assert _tls_push(public, links["ca"], None) == b""


def test_a_peer_with_another_cas_certificate_is_refused(links):
    public = ("127.0.0.1", links["cluster"].spu_ports["alice"])
    outsider = (str(links["folder"] / "outsider.crt"), str(links["folder"] / "outsider.key"))
    assert _tls_push(public, links["ca"], outsider) == b""
