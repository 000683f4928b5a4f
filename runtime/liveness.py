"""Peer liveness in a party process: fail fast, naming the peer, instead of hanging.

SecretFlow and SPU wait for a dead or absent peer until an RPC timeout of a minute or
more, or crash the process without a message. A `PeerWatch` thread in every party probes
each peer's SecretFlow port with a plain TCP connect (liveness only; no data moves):

- with TLS (the cluster file's `tls`), the first answer of each peer is a full mutual-TLS
  handshake against the cluster's CA: a peer whose certificate the CA did not sign, or
  that speaks no TLS, or that refuses ours, stops this party at once with one line naming
  it, before any data moves;
- until every peer has answered once, a peer that does not answer within
  `connect_timeout_s` stops this party: ``peer carol at 127.0.0.1:40123 unreachable after
  60 s``;
- afterwards, a peer that stops answering for `lost_after_s` stops this party: ``lost
  party carol (127.0.0.1:40123 stopped answering); the checkpoints ... --resume``.

A TCP accept is no proof of life: the kernel completes the handshake for a process that
is stopped (SIGSTOP, a hung host under a debugger) or wedged. So every party also runs a
`HeartbeatResponder`, a Python thread answering UDP datagrams on its SecretFlow port
number, and the watch pings each peer there: a peer that has answered once and then is
silent for `hung_after_s` (while its TCP port still accepts) stops this party with ``lost
party carol (... accepts connections, but its process has not answered a heartbeat for
15 s: stopped or hung)``. Before a peer's first answer (UDP filtered on the path) only the
TCP probe counts. The heartbeat carries no data and no secret; a forged answer can only
delay the detection of a dead peer, which the RPC timeouts then catch.

Either way the party prints that one line and leaves with `LOST_PEER_EXIT` at once
(`os._exit`: a thread blocked in a C++ receive cannot be interrupted, and the checkpoints
are written atomically, so nothing is half-written). `stop()` ends the watch, before the
shutdown barrier of a finished run, when peers may leave.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable

LOST_PEER_EXIT = 75  # EX_TEMPFAIL: relaunch with --resume


def answers(host: str, port: int, timeout_s: float) -> bool:
    """Does something accept TCP connections at host:port within timeout_s?"""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tls_refusal(host: str, port: int, tls: dict[str, str], timeout_s: float, handshake_s: float = 5.0) -> str | None:  # fmt: skip
    """Mutual-TLS handshake with host:port: None if both sides accept, else why not (a
    peer that accepts the connection but gives no TLS answer within `handshake_s` speaks
    no TLS). Raises OSError when nothing accepts the connection yet (not a refusal)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls["ca_cert"])
    context.load_cert_chain(tls["cert"], tls["key"])
    context.check_hostname = False  # parties are addressed by IP; the CA is the trust anchor
    context.set_alpn_protocols(["h2"])  # SecretFlow's cross-silo link is gRPC
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        raw.settimeout(handshake_s)
        try:
            with context.wrap_socket(raw, server_hostname=host) as conn:
                conn.settimeout(0.5)
                try:  # TLS 1.3: the server's verdict on OUR certificate comes after the handshake
                    if conn.recv(1) == b"":
                        return "the peer closed the connection after the handshake"
                except TimeoutError:
                    pass
        except ssl.SSLError as error:
            return error.reason or str(error)
        except ConnectionResetError:
            return "the peer closed the connection during the TLS handshake"
        except TimeoutError:
            return f"no TLS answer within {handshake_s:.0f} s"
    return None


HEARTBEAT = b"secfwt-heartbeat"


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


class HeartbeatResponder:
    """Answer heartbeats on UDP `host:port` from a daemon thread (module doc)."""

    def __init__(self, host: str, port: int):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"heartbeat-{port}", daemon=True)  # fmt: skip

    def __enter__(self) -> HeartbeatResponder:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(256)
            except TimeoutError:
                continue
            except OSError:
                return
            if data.startswith(HEARTBEAT):
                try:
                    self._sock.sendto(data, sender)
                except OSError:
                    pass


def _exit_with(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(LOST_PEER_EXIT)


class PeerWatch:
    """Probe `peers` ({name: (host, port)}) from a daemon thread (module doc)."""

    def __init__(
        self,
        me: str,
        peers: dict[str, tuple[str, int]],
        *,
        connect_timeout_s: float = 60.0,
        lost_after_s: float = 5.0,
        interval_s: float = 0.5,
        on_failure: Callable[[str], None] = _exit_with,
        tls: dict[str, str] | None = None,
        hung_after_s: float = 15.0,
    ):
        if connect_timeout_s <= 0 or lost_after_s <= 0:
            raise ValueError("PeerWatch: connect_timeout_s and lost_after_s must be positive")
        self.me, self.peers = me, dict(peers)
        self.connect_timeout_s, self.lost_after_s, self.interval_s = connect_timeout_s, lost_after_s, interval_s  # fmt: skip
        self.on_failure, self.tls, self.hung_after_s = on_failure, tls, hung_after_s
        self.linger_s = 3.0
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.setblocking(False)
        self._answered: dict[str, float] = {}  # peer -> when its heartbeat last answered
        self._by_address = {(_resolve(h), p): n for n, (h, p) in self.peers.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"peer-watch-{me}", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._udp.close()

    def _heartbeats(self) -> None:
        """Collect the answers that came in, then ping every peer once more."""
        by_address = self._by_address
        while True:
            try:
                data, sender = self._udp.recvfrom(256)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable from a peer without a responder
                continue
            name = by_address.get(sender)
            if name is not None and data == HEARTBEAT + b" " + name.encode():
                self._answered[name] = time.monotonic()
        for name, address in self.peers.items():
            try:
                self._udp.sendto(HEARTBEAT + b" " + name.encode(), address)
            except OSError:
                pass

    def _hung(self, name: str) -> bool:
        """Has `name` answered heartbeats and then fallen silent for `hung_after_s`?"""
        seen = self._answered.get(name)
        return seen is not None and time.monotonic() - seen > self.hung_after_s

    def _probe(self, name: str, first: bool) -> bool:
        host, port = self.peers[name]
        if not (first and self.tls):
            return answers(host, port, timeout_s=min(2.0, self.lost_after_s))
        try:
            refusal = tls_refusal(host, port, self.tls, timeout_s=2.0)
        except OSError:
            return False  # not up yet
        if refusal:
            # keep our port up a moment so the peer's own probe meets the same refusal
            self._stop.wait(self.linger_s)
            self.on_failure(f"secfwt party {self.me}: mutual TLS with peer {name} at {host}:{port} failed ({refusal}); no data was sent")  # fmt: skip
            self._stop.set()
            return False
        return True

    def _watch(self) -> None:
        start = time.monotonic()
        last_seen: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            self._heartbeats()
            for name, (host, port) in self.peers.items():
                if self._stop.is_set():
                    return
                if self._probe(name, first=name not in last_seen):
                    last_seen[name] = time.monotonic()
                elif self._stop.is_set():
                    return
                elif name not in last_seen and now - start > self.connect_timeout_s:
                    return self.on_failure(f"secfwt party {self.me}: peer {name} at {host}:{port} unreachable after {self.connect_timeout_s:.0f} s")  # fmt: skip
                elif name in last_seen and time.monotonic() - last_seen[name] > self.lost_after_s:  # fmt: skip
                    return self.on_failure(f"secfwt party {self.me}: lost party {name} ({host}:{port} stopped answering); relaunch with --resume to continue from the last checkpoint")  # fmt: skip
                if self._hung(name):
                    return self.on_failure(f"secfwt party {self.me}: lost party {name} ({host}:{port} accepts connections, but its process has not answered a heartbeat for {self.hung_after_s:.0f} s: stopped or hung); relaunch with --resume to continue from the last checkpoint")  # fmt: skip
            self._stop.wait(self.interval_s)


__all__ = ["HEARTBEAT", "LOST_PEER_EXIT", "HeartbeatResponder", "PeerWatch", "answers"]
