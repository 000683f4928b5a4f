"""The link shaper relays bytes unchanged and gives a loopback link the bandwidth,
latency, stalls and cuts asked of it, measured on real sockets."""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from secfwt_jax.runtime.link_shaper import PROFILES, LinkProfile, LinkShaper


class Echo:
    """A TCP echo server on loopback (a thread per connection)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


@pytest.fixture()
def echo():
    server = Echo()
    yield server
    server.server.close()


def _round_trip(port: int, payload: bytes, timeout: float = 30) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        start = time.monotonic()
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        got = bytearray()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return bytes(got), time.monotonic() - start


def test_bytes_pass_unchanged_and_are_counted(echo):
    payload = os.urandom(3 << 20)
    with LinkShaper({"a->b": ("127.0.0.1", echo.port)}) as shaper:
        got, _ = _round_trip(shaper.port("a->b"), payload)
        time.sleep(0.1)
        assert got == payload
        assert shaper.relayed()["a->b"] == {"forward": len(payload), "backward": len(payload)}


def test_latency_is_added_each_way(echo):
    with LinkShaper({"l": ("127.0.0.1", echo.port)}, LinkProfile(latency_s=0.1)) as shaper:
        _, seconds = _round_trip(shaper.port("l"), b"ping")
    assert 0.2 <= seconds < 0.4


def test_bandwidth_limits_throughput(echo):
    payload = os.urandom(1 << 20)  # 8.4 Mbit each way, pipelined: about 0.42 s at 20 Mbps
    with LinkShaper({"b": ("127.0.0.1", echo.port)}, LinkProfile(bandwidth_bps=20e6)) as shaper:
        got, seconds = _round_trip(shaper.port("b"), payload)
    assert got == payload and 0.42 <= seconds < 1.5


def test_a_stall_holds_one_direction_and_loses_nothing(echo):
    with LinkShaper({"s": ("127.0.0.1", echo.port)}) as shaper:
        shaper.stall("s", "backward", 0.8)
        got, seconds = _round_trip(shaper.port("s"), b"held back")
        assert got == b"held back" and 0.7 <= seconds < 1.5
        _, seconds = _round_trip(shaper.port("s"), b"after")
        assert seconds < 0.3


def test_a_cut_resets_open_connections_and_refuses_new_ones_until_it_ends(echo):
    with LinkShaper({"c": ("127.0.0.1", echo.port)}) as shaper:
        conn = socket.create_connection(("127.0.0.1", shaper.port("c")), timeout=5)
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        shaper.cut("c", 1.0)
        time.sleep(0.2)
        with pytest.raises(OSError):  # reset, or closed: either way the link is gone
            conn.sendall(b"y" * 65536)
            if not conn.recv(1):
                raise ConnectionResetError
        conn.close()
        during = socket.create_connection(("127.0.0.1", shaper.port("c")), timeout=5)
        during.sendall(b"z")
        try:  # accepted by the kernel, then closed or reset by the relay: nothing comes back
            assert during.recv(1) == b""
        except ConnectionResetError:
            pass
        during.close()
        time.sleep(1.0)
        got, _ = _round_trip(shaper.port("c"), b"back")
        assert got == b"back"


def test_the_measured_profiles_are_the_issue_s():
    assert PROFILES["lan"] == LinkProfile(1e9, 0.0005)
    assert PROFILES["wan"] == LinkProfile(100e6, 0.020)
    assert PROFILES["edge"] == LinkProfile(10e6, 0.050)
    with pytest.raises(ValueError, match="bandwidth_bps"):
        LinkProfile(bandwidth_bps=0)


@pytest.mark.cluster
@pytest.mark.slow  # a whole 3-party job through 12 relays: about 2 min; the slow-link test below stays
@pytest.mark.timeout(900)
def test_a_job_through_shaped_links_gives_the_direct_result(tmp_path):
    """Every party reaches every peer's SecretFlow and SPU ports through its own LAN
    relay (12 links for 3 parties); the tuned parameters equal the simulator's."""
    from secfwt_jax.run.reference import relative_gap
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster_run import launch_local, load_theta
    from secfwt_jax.runtime.finetune import PrivateSeeds
    from secfwt_jax.runtime.sim_run import finetune_in_simulator

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    overrides = ["tuning.steps=1", "evaluation.mpc_examples=4"]
    spec = load_spec(tiny, overrides)
    relays: list = []
    results = launch_local(spec, str(tiny), overrides, 7, out_dir=tmp_path / "run", timeout_s=600,
                           work_dir=tmp_path / "work", link="lan", relays=relays)  # fmt: skip
    relayed = relays[0].relayed()
    assert len(relayed) == 12 and all(sum(d.values()) > 0 for name, d in relayed.items() if name.startswith("spu")), relayed  # fmt: skip
    reference = finetune_in_simulator(
        spec, seeds=PrivateSeeds(7), out_dir=tmp_path / "sim", progress=False
    )
    tuned = load_theta(results["alice"]["tuned_params"]["path"])
    assert relative_gap(tuned, load_theta(reference["tuned_params"]["path"])) < 1e-3


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_a_large_product_on_a_slow_link_does_not_trip_the_scaled_timeouts(tmp_path):
    """A 500,000-element secret product over 8 Mbps SPU links: each of its 4 MB messages
    takes about 4 s, twice the 2 s base timeout given here, and passes because the
    timeouts are scaled with the program's largest message."""
    import contextlib
    import dataclasses

    from cluster_jobs import JOBS_ENV, big_product_plaintext

    from secfwt_jax.runtime.cluster import loopback_cluster
    from secfwt_jax.runtime.cluster_run import _through_relays
    from secfwt_jax.runtime.launcher import launch_parties

    base, bandwidth = 2.0, 8e6
    cluster = dataclasses.replace(loopback_cluster(["alice", "bob", "carol"], "ABY3", "FM64"),
                                  link_timeout_s=base, slowest_link_bps=bandwidth)  # fmt: skip
    args = {"n": 1000, "repeat": 500}
    with contextlib.ExitStack() as stack:
        shaped = _through_relays(cluster, LinkProfile(bandwidth, 0.001), stack, None)
        results = launch_parties(shaped, "cluster_jobs:big_product_job", args,
                                 timeout_s=400, work_dir=tmp_path, env=JOBS_ENV)  # fmt: skip
    want = big_product_plaintext(**args)
    message_s = 500_000 * 8 * 8 / bandwidth  # one share of the product, one way
    for r in results.values():
        assert abs(r["value"] - want) < 1e-3 * abs(want) + 5, (r, want)
        assert message_s > base and r["product_s"] > message_s  # the base alone would trip
        assert r["recv_timeout_ms"] / 1000 > 3 * message_s and r["http_timeout_ms"] / 1000 > base
