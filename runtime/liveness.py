"""Peer liveness in a party process: fail fast, naming the peer, instead of hanging.

SecretFlow and SPU wait for a dead or absent peer until an RPC timeout of a minute or
more, or crash the process without a message. A `PeerWatch` thread in every party probes
each peer's SecretFlow port with a plain TCP connect (liveness only; no data moves):

- until every peer has answered once, a peer that does not answer within
  `connect_timeout_s` stops this party: ``peer carol at 127.0.0.1:40123 unreachable after
  60 s``;
- afterwards, a peer that stops answering for `lost_after_s` stops this party: ``lost
  party carol (127.0.0.1:40123 stopped answering); the checkpoints ... --resume``.

Either way the party prints that one line and leaves with `LOST_PEER_EXIT` at once
(`os._exit`: a thread blocked in a C++ receive cannot be interrupted, and the checkpoints
are written atomically, so nothing is half-written). `stop()` ends the watch, before the
shutdown barrier of a finished run, when peers may leave.
"""

from __future__ import annotations

import os
import socket
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
    ):
        if connect_timeout_s <= 0 or lost_after_s <= 0:
            raise ValueError("PeerWatch: connect_timeout_s and lost_after_s must be positive")
        self.me, self.peers = me, dict(peers)
        self.connect_timeout_s, self.lost_after_s, self.interval_s = connect_timeout_s, lost_after_s, interval_s  # fmt: skip
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"peer-watch-{me}", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _probe(self, name: str) -> bool:
        host, port = self.peers[name]
        return answers(host, port, timeout_s=min(2.0, self.lost_after_s))

    def _watch(self) -> None:
        start = time.monotonic()
        last_seen: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            for name, (host, port) in self.peers.items():
                if self._stop.is_set():
                    return
                if self._probe(name):
                    last_seen[name] = time.monotonic()
                elif name not in last_seen and now - start > self.connect_timeout_s:
                    return self.on_failure(f"secfwt party {self.me}: peer {name} at {host}:{port} unreachable after {self.connect_timeout_s:.0f} s")  # fmt: skip
                elif name in last_seen and time.monotonic() - last_seen[name] > self.lost_after_s:  # fmt: skip
                    return self.on_failure(f"secfwt party {self.me}: lost party {name} ({host}:{port} stopped answering); relaunch with --resume to continue from the last checkpoint")  # fmt: skip
            self._stop.wait(self.interval_s)


__all__ = ["LOST_PEER_EXIT", "PeerWatch", "answers"]
