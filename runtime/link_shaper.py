"""A user-space link shaper: TCP relays that give loopback links the bandwidth, latency,
jitter and faults of real ones.

Kernel traffic shaping (tc netem) needs privileges these hosts do not give, so each link
is a relay in this process: it listens on a port of its own, and for every connection a
party makes to it, opens one to the real target and copies bytes both ways. A party is
sent to its peers through the relays by giving it the relays' ports as the peers'
addresses; the peers still listen on their own. Bytes are relayed unchanged, so TLS runs
end to end through a relay (the relay sees ciphertext only).

Per link and direction (`LinkProfile`):
- bandwidth: the link serialises at most `bandwidth_bps` bits per second; a chunk leaves
  when the link is free and its last bit is sent;
- one-way latency, plus jitter drawn uniformly from [0, jitter_s) per chunk (delivery
  order is kept: a chunk never overtakes the one before, as on one TCP stream);
- faults at run time: `cut(seconds)` closes every connection of the link and refuses new
  ones for that long; `stall(direction, seconds)` holds one direction's bytes (nothing
  is lost: they arrive when the stall ends); `set_profile` changes the link's profile
  (a bandwidth drop to 1% for ten seconds is two calls).

Cost model: a chunk of b bytes arriving at t leaves at max(t, free) + 8b / bandwidth, where
`free` is when the previous chunk finished, and is delivered latency (+ jitter) later;
this is the store-and-forward model `compile/network.py` assumes per message.

The relay's own cost at no shaping (`benchmarks/link_overhead.py`, 2026-12-06, this 2-core
host beside a 3-party job): about 65 us more per round trip (76 us against 10.5 us
direct) and 2.4 Gbit/s each way at most (direct loopback: 12.4), so its bandwidth is
no limit for the 1 Gbps LAN profile and slower links (its latency is; next paragraph).

A shaped delivery waits on an asyncio timer, which on a loaded host wakes late: with three
parties on this 2-core host a 0.5 ms one-way link measured 2.72 ms per round trip instead
of 1.0 (median of 500), about 0.9 ms more per delivery. That matters at the LAN profile
(thousands of rounds of 0.5 ms) and not at WAN or edge latencies (`docs/links.md`).

`cluster_run.launch_local(link=...)` (and `secfwt cluster launch --link`) routes every
party's SecretFlow and SPU links through relays of one profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time

CHUNK = 64 * 1024  # bytes read at a time; a chunk is the unit of shaping
DIRECTIONS = ("forward", "backward")  # to the target, back from it


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """One link's shape, the same both ways. None bandwidth: not limited."""

    bandwidth_bps: float | None = None
    latency_s: float = 0.0
    jitter_s: float = 0.0

    def __post_init__(self):
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"LinkProfile.bandwidth_bps: must be positive, got {self.bandwidth_bps}")  # fmt: skip
        if self.latency_s < 0 or self.jitter_s < 0:
            raise ValueError("LinkProfile.latency_s, jitter_s: must be >= 0")


#: The link conditions of the measured runs (one way).
PROFILES = {
    "none": LinkProfile(),
    "lan": LinkProfile(1e9, 0.0005),
    "wan": LinkProfile(100e6, 0.020),
    "edge": LinkProfile(10e6, 0.050),
}


class _Direction:
    """One direction of one link: its clock, and when it is stalled."""

    def __init__(self):
        self.free_at = 0.0  # when the link has sent the last chunk it was given
        self.last_delivery = 0.0
        self.stalled_until = 0.0


class Link:
    """One relay: `listen` -> `target`, shaped by a profile (module doc)."""

    def __init__(self, name: str, target: tuple[str, int], profile: LinkProfile, seed: int):
        self.name, self.target, self.profile = name, target, profile
        self.rng = random.Random(seed)
        self.directions = {d: _Direction() for d in DIRECTIONS}
        self.cut_until = 0.0
        self.relayed = {d: 0 for d in DIRECTIONS}
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None

    def delivery_time(self, direction: str, size: int, now: float) -> float:
        """When a chunk of `size` bytes that arrived at `now` is delivered (module doc)."""
        d, p = self.directions[direction], self.profile
        send = 8 * size / p.bandwidth_bps if p.bandwidth_bps else 0.0
        d.free_at = max(now, d.free_at) + send
        jitter = self.rng.uniform(0, p.jitter_s) if p.jitter_s else 0.0
        d.last_delivery = max(d.free_at + p.latency_s + jitter, d.last_delivery)
        return d.last_delivery

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.cut_until:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(
                self._pump("forward", reader, up_writer), self._pump("backward", up_reader, writer)
            )
        except asyncio.CancelledError:
            pass  # the shaper is stopping
        finally:
            for w in pair:
                w.close()
            self._writers -= pair

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # fmt: skip
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)

        async def deliver():
            while True:
                item = await queue.get()
                if item is None:
                    break
                at, data = item
                while True:  # wait for the delivery time and any stall of this direction
                    now = time.monotonic()
                    wait = max(at, self.directions[direction].stalled_until) - now
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.relayed[direction] += len(data)
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                await queue.put((self.delivery_time(direction, len(data), time.monotonic()), data))  # fmt: skip
            await queue.put(None)
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            writer.close()

    def cut_now(self, seconds: float) -> None:
        """Close every connection of this link and refuse new ones for `seconds`."""
        self.cut_until = time.monotonic() + seconds
        for w in list(self._writers):
            transport = w.transport
            if transport is not None:
                transport.abort()  # a reset, as a cut link gives, not a clean close


class LinkShaper:
    """Relays for named links, served by one asyncio loop in a daemon thread.

    `with LinkShaper({"alice->carol": ("127.0.0.1", 40123)}, "wan") as shaper:` then
    `shaper.port("alice->carol")` is where alice dials carol. Faults: `cut`, `stall`,
    `set_profile` (module doc), safe to call from any thread."""

    def __init__(self, targets: dict[str, tuple[str, int]], profile: LinkProfile | str = "none", *, host: str = "127.0.0.1", seed: int = 0):  # fmt: skip
        shape = PROFILES[profile] if isinstance(profile, str) else profile
        self.host = host
        self.links = {name: Link(name, t, shape, seed + i) for i, (name, t) in enumerate(sorted(targets.items()))}  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-shaper", daemon=True)  # fmt: skip

    def __enter__(self) -> LinkShaper:
        self._thread.start()
        self._call(self._start_all()).result(timeout=10)
        return self

    def __exit__(self, *_) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop_all()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start_all(self) -> None:
        for link in self.links.values():
            link._server = await asyncio.start_server(link._accept, self.host, 0, reuse_address=True)  # fmt: skip
            link.port = link._server.sockets[0].getsockname()[1]

    async def _stop_all(self) -> None:
        for link in self.links.values():
            if link._server is not None:
                link._server.close()
            link.cut_now(0)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def port(self, name: str) -> int:
        return self.links[name].port

    def address(self, name: str) -> tuple[str, int]:
        return self.host, self.links[name].port

    def cut(self, name: str, seconds: float) -> None:
        self._loop.call_soon_threadsafe(self.links[name].cut_now, seconds)

    def stall(self, name: str, direction: str, seconds: float) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"stall: direction {direction!r} not one of {DIRECTIONS}")
        until = time.monotonic() + seconds
        self._loop.call_soon_threadsafe(setattr, self.links[name].directions[direction], "stalled_until", until)  # fmt: skip

    def set_profile(self, name: str, profile: LinkProfile | str) -> None:
        shape = PROFILES[profile] if isinstance(profile, str) else profile
        self._loop.call_soon_threadsafe(setattr, self.links[name], "profile", shape)

    def relayed(self) -> dict[str, dict[str, int]]:
        """Bytes delivered so far, per link and direction."""
        return {name: dict(link.relayed) for name, link in self.links.items()}


__all__ = ["PROFILES", "Link", "LinkProfile", "LinkShaper"]
