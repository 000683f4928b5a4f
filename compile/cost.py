"""Communication cost of an SPU run, parsed from SPU's profile log.

spu 0.9.3b0 exposes no link statistics to Python. With ``enable_pphlo_profile`` (and
``enable_hal_profile``) each runtime logs, through spdlog on the C++ side (stdout), a block
at the end of ``Runtime.run``::

    [...] [info] [api.cc:172] [Profiling] SPU execution f completed, input processing took ...
    [...] [info] [api.cc:220] HLO profiling: total time 0.00026905
    [...] [info] [api.cc:223] - pphlo.dot, executed 1 times, duration 0.000226026s, send bytes 384 recv bytes 384, send actions 2, recv actions 2
    [...] [info] [api.cc:220] HAL profiling: total time 0.000245034      (hal profile only)
    [...] [info] [api.cc:223] - f_mmul, executed 1 times, duration ..., send bytes 384 ...
    [...] [info] [api.cc:220] MPC profiling: total time 0.000226796      (hal profile only)
    [...] [info] [api.cc:223] - mmul_aa, executed 1 times, duration ..., send bytes 256 ...
    [...] [info] [api.cc:233] Link details: total send bytes 512, recv bytes 512, send actions 3, recv actions 3

Lines name no rank, and when every rank profiles, the ranks' blocks interleave line by line
(they finish together). So the simulator profiles all ranks in ONE run with
``enable_pphlo_profile``, and rank 0 alone also with ``enable_hal_profile``. Then every
line can be attributed: ``Link details`` lines are one per party; ``pphlo.*`` op lines come
from all parties; HAL/MPC headers and the other op lines come only from rank 0.

Figures cover one ``Runtime.run`` (not runtime set-up, share making or reconstruction).
Units:
    bytes   -- bytes *sent* over the links.
    rounds  -- "send actions": link send calls. A 2PC/3PC round is normally one send per
               party, so per party this is its round count; it over-counts rounds when a
               party sends to several peers at once or in chunks (CHEETAH's OT does both).
    calls   -- times the op executed.
    time    -- seconds of wall time; noisy, unlike bytes/rounds.

Determinism: ``total_bytes``, ``total_send_actions`` and per-op ``bytes``/``sends`` (sums
over parties) are exact and repeatable. Per-party figures and ``max_rounds`` are repeatable
for SEMI2K/CHEETAH but NOT for ABY3: its truncation picks the helper party from a public
PRG seeded afresh by every runtime, so which party sends more varies run to run.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence

# spdlog's default pattern brackets the timestamp; SPU's own LogOptions pattern (set by
# ``spu.logging.setup_logging``, e.g. in a SecretFlow party) does not. Accept both.
_PREFIX = r"^(?:\[[^\]]*\]|\d{4}-\d\d-\d\d [\d:.]+) \[\w+\] \[[^\]]*\] "
_START = re.compile(_PREFIX + r"\[Profiling\] SPU execution (?P<name>.*) completed")
_SECTION = re.compile(_PREFIX + r"(?P<sec>HLO|HAL|MPC) profiling: total time")
_OP = re.compile(
    _PREFIX + r"- (?P<op>.+?), executed (?P<calls>\d+) times, duration (?P<time>[0-9.eE+-]+)s, "
    r"send bytes (?P<sb>\d+) recv bytes (?P<rb>\d+), send actions (?P<sa>\d+), "
    r"recv actions (?P<ra>\d+)"
)
_LINK = re.compile(
    _PREFIX + r"Link details: total send bytes (?P<sb>\d+), recv bytes (?P<rb>\d+), "
    r"send actions (?P<sa>\d+), recv actions (?P<ra>\d+)"
)


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One op's cost. Aggregated over parties: ``bytes`` and ``sends`` are sums, ``rounds``
    (send actions), ``calls`` and ``time`` the max. For a single party ``sends == rounds``."""

    bytes: int
    rounds: int
    sends: int
    calls: int
    time: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _merge(cs: Sequence[OpCost]) -> OpCost:
    return OpCost(
        bytes=sum(c.bytes for c in cs),
        rounds=max(c.rounds for c in cs),
        sends=sum(c.sends for c in cs),
        calls=max(c.calls for c in cs),
        time=max(c.time for c in cs),
    )


def is_profile_line(line: str) -> bool:
    """True for the SPU profile lines :func:`parse_profile_log` consumes."""
    return any(p.search(line) for p in (_START, _SECTION, _OP, _LINK))


@dataclasses.dataclass(frozen=True)
class CommCost:
    """Communication of one SPU run.

    Attributes:
        per_party_bytes: bytes each party sent, one entry per party, LARGEST FIRST -- not
            in rank order (the log names no rank). Entry i pairs with per_party_rounds[i].
        per_party_rounds: send actions of the same parties.
        total_bytes: sum of per_party_bytes: all traffic on all links. (SPU's stock
            simulator shows only rank 0's sent bytes, one of the per-party entries.)
        total_send_actions: sum of per_party_rounds.
        max_rounds: max of per_party_rounds, the latency-relevant round count.
        per_op: pphlo op -> OpCost over all parties (bytes/sends summed, rounds max).
        per_section: "pphlo" -> per_op; "hal" and "mpc" -> op -> OpCost of RANK 0 ONLY
            (empty if rank 0 had no hal profile).
    """

    per_party_bytes: list[int]
    per_party_rounds: list[int]
    total_bytes: int
    total_send_actions: int
    max_rounds: int
    per_op: dict[str, OpCost]
    per_section: dict[str, dict[str, OpCost]]

    def to_dict(self) -> dict:
        return {
            "per_party_bytes": self.per_party_bytes,
            "per_party_rounds": self.per_party_rounds,
            "total_bytes": self.total_bytes,
            "total_send_actions": self.total_send_actions,
            "max_rounds": self.max_rounds,
            "per_op": {k: v.to_dict() for k, v in self.per_op.items()},
            "per_section": {
                s: {k: v.to_dict() for k, v in ops.items()} for s, ops in self.per_section.items()
            },
            "notes": {
                "bytes": "bytes sent",
                "rounds": "link send actions",
                "time": "seconds, noisy",
                "per_party": "largest first, not rank order",
                "hal/mpc sections": "rank 0 only",
            },
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def parse_profile_log(text: str, world_size: int) -> CommCost:
    """Parse the captured log of ONE run in which every rank had ``enable_pphlo_profile``
    and only rank 0 had ``enable_hal_profile`` (lines may interleave).

    Raises ValueError unless exactly ``world_size`` ``Link details`` lines are present, or
    if a non-pphlo op line appears before any HAL/MPC header.
    """
    parties: list[tuple[int, int]] = []
    pphlo: dict[str, list[OpCost]] = {}
    detail: dict[str, dict[str, list[OpCost]]] = {"hal": {}, "mpc": {}}
    sec: str | None = None  # rank 0's current hal/mpc section
    for line in text.splitlines():
        if m := _SECTION.search(line):
            if m["sec"] != "HLO":
                sec = m["sec"].lower()
        elif m := _OP.search(line):
            c = OpCost(int(m["sb"]), int(m["sa"]), int(m["sa"]), int(m["calls"]), float(m["time"]))
            if m["op"].startswith("pphlo."):
                pphlo.setdefault(m["op"], []).append(c)
            elif sec is None:
                raise ValueError(f"op line before any HAL/MPC section: {line!r}")
            else:
                detail[sec].setdefault(m["op"], []).append(c)
        elif m := _LINK.search(line):
            parties.append((int(m["sb"]), int(m["sa"])))
    if len(parties) != world_size:
        raise ValueError(
            f"world_size: expected {world_size} 'Link details' lines, found {len(parties)}"
        )
    parties.sort(reverse=True)
    per_op = {k: _merge(v) for k, v in sorted(pphlo.items())}
    sections = {"pphlo": per_op}
    sections.update({s: {k: _merge(v) for k, v in sorted(d.items())} for s, d in detail.items()})
    b = [p[0] for p in parties]
    r = [p[1] for p in parties]
    return CommCost(b, r, sum(b), sum(r), max(r), per_op, sections)


# --------------------------------------------------------------------------- capture

_CAPTURE_LOCK = threading.Lock()
_LIBC = ctypes.CDLL(None)


def _flush_all() -> None:
    for s in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            s.flush()
    _LIBC.fflush(None)  # C stdio buffers (spdlog writes through them)


@dataclasses.dataclass
class Captured:
    """Text written to the captured file descriptors; filled in when the block exits."""

    text: str = ""


@contextlib.contextmanager
def capture_fds(fds: Sequence[int] = (1, 2), passthrough: bool = True) -> Iterator[Captured]:
    """Redirect file descriptors ``fds`` (default stdout and stderr) to temp files.

    Works for output written by C++ (spdlog) as well as Python. Process-wide, so one
    capture runs at a time (a module lock serialises them); other threads' output during
    the block is captured too. With ``passthrough``, lines that are not profile lines are
    written back to their original descriptor afterwards, so warnings stay visible.
    """
    out = Captured()
    with _CAPTURE_LOCK:
        tmps = [tempfile.TemporaryFile() for _ in fds]
        saved: list[int] = []
        try:
            _flush_all()
            for fd, tmp in zip(fds, tmps, strict=True):
                saved.append(os.dup(fd))
                os.dup2(tmp.fileno(), fd)
            yield out
        finally:
            _flush_all()
            for fd, s in zip(fds, saved, strict=False):
                os.dup2(s, fd)
                os.close(s)
            texts = []
            for fd, tmp in zip(fds, tmps, strict=True):
                tmp.seek(0)
                t = tmp.read().decode("utf-8", errors="replace")
                tmp.close()
                texts.append(t)
                if passthrough:
                    rest = "".join(
                        ln for ln in t.splitlines(keepends=True) if not is_profile_line(ln)
                    )
                    if rest:
                        os.write(fd, rest.encode())
            out.text = "".join(texts)
