"""A simple network model: turn measured bytes and rounds into estimated seconds.

    time = compute_s + bytes * 8 / bandwidth_bps + rounds * latency_s

``bytes`` and ``rounds`` are the figures of ONE party's link (the profiler passes the
mean per party: ``total_bytes / world_size`` and ``total_send_actions / world_size``, see
:mod:`secfwt_jax.compile.profiler`): parties send in parallel, each over its own link of
``bandwidth_bps``, and every round costs one one-way latency. This is a first-order model:
it ignores congestion, TCP windows, and overlap of compute with communication.

Presets follow SecFwT's evaluation settings (Luo, Zhang et al. 2025): LAN 3 Gbps / 0.8 ms,
WAN 100 Mbps / 80 ms and WAN 200 Mbps / 40 ms.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _check_nonneg(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class NetworkModel:
    """One network setting.

    Attributes:
        name: label used in tables and JSON.
        bandwidth_bps: link bandwidth in bits per second (> 0).
        latency_s: one-way latency per round in seconds (>= 0).
    """

    name: str
    bandwidth_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        _check_nonneg("bandwidth_bps", self.bandwidth_bps)
        if self.bandwidth_bps == 0:
            raise ValueError("bandwidth_bps: must be > 0")
        _check_nonneg("latency_s", self.latency_s)

    def transfer_s(self, nbytes: float) -> float:
        """Seconds to push ``nbytes`` bytes through the link."""
        _check_nonneg("bytes", nbytes)
        return nbytes * 8.0 / self.bandwidth_bps

    def latency_total_s(self, rounds: float) -> float:
        """Seconds of latency for ``rounds`` sequential rounds."""
        _check_nonneg("rounds", rounds)
        return rounds * self.latency_s

    def estimate(self, nbytes: float, rounds: float, compute_s: float = 0.0) -> float:
        """Estimated seconds: ``compute_s + nbytes * 8 / bandwidth_bps + rounds * latency_s``."""
        _check_nonneg("compute_s", compute_s)
        return compute_s + self.transfer_s(nbytes) + self.latency_total_s(rounds)

    def breakdown(self, nbytes: float, rounds: float, compute_s: float = 0.0) -> dict:
        """The estimate and its three terms, in seconds (JSON-ready)."""
        return {
            "network": self.name,
            "compute_s": compute_s,
            "transfer_s": self.transfer_s(nbytes),
            "latency_s": self.latency_total_s(rounds),
            "total_s": self.estimate(nbytes, rounds, compute_s),
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: SecFwT's network settings.
PRESETS: dict[str, NetworkModel] = {
    "lan": NetworkModel("lan", bandwidth_bps=3e9, latency_s=0.8e-3),
    "wan100": NetworkModel("wan100", bandwidth_bps=100e6, latency_s=80e-3),
    "wan200": NetworkModel("wan200", bandwidth_bps=200e6, latency_s=40e-3),
}


def get(name: str) -> NetworkModel:
    """The preset called ``name`` (case-insensitive); one-line ValueError if unknown."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"network: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]


# ---------------------------------------------------------------- link timeouts
#: SPU splits a message into HTTP requests of at most this many bytes (SecretFlow's
#: default `http_max_payload_size` for its SPU links: spu's own default, 1 MiB).
HTTP_PAYLOAD_BYTES = 1 << 20
#: A message of a secret tensor of n elements is bounded by this many ring elements per
#: element: a replicated share (ABY3: 2 per party), and under SEMI2K a Beaver triple
#: dealt for it (3); the opened differences of a product are 2. The largest of these.
RING_ELEMENTS_PER_ELEMENT = 3


def message_bound_bytes(largest_tensor_elements: int, ring_bytes: int) -> int:
    """An upper bound on the largest single link message of a program whose largest
    tensor has ``largest_tensor_elements`` elements, in a ring of ``ring_bytes`` bytes."""
    return int(largest_tensor_elements) * int(ring_bytes) * RING_ELEMENTS_PER_ELEMENT


@dataclasses.dataclass(frozen=True)
class LinkTimeouts:
    """SPU link timeouts for one run (milliseconds, as spu's link ``Desc`` takes them).

    ``recv_timeout_ms`` bounds how long a party waits for one whole message, and
    ``http_timeout_ms`` one HTTP request of it (at most ``HTTP_PAYLOAD_BYTES``)."""

    recv_timeout_ms: int
    http_timeout_ms: int
    largest_message_bytes: int
    slowest_link_bps: float

    def link_desc(self) -> dict[str, int]:
        return {"recv_timeout_ms": self.recv_timeout_ms, "http_timeout_ms": self.http_timeout_ms}


def scaled_timeout_ms(nbytes: float, slowest_link_bps: float, base_s: float, margin: float = 3.0) -> int:  # fmt: skip
    """``base_s`` plus ``margin`` times the seconds ``nbytes`` take on the slowest link, in ms."""
    _check_nonneg("bytes", nbytes)
    _check_nonneg("slowest_link_bps", slowest_link_bps)
    _check_nonneg("base_s", base_s)
    if slowest_link_bps == 0:
        raise ValueError("slowest_link_bps: must be > 0")
    return int(math.ceil(1000 * (base_s + margin * 8 * nbytes / slowest_link_bps)))


def link_timeouts(largest_message_bytes: int, slowest_link_bps: float, base_s: float = 120.0, margin: float = 3.0) -> LinkTimeouts:  # fmt: skip
    """Timeouts that let the largest message cross the slowest link ``margin`` times over,
    on top of ``base_s`` (SecretFlow's default, 120 s: room for a peer's compute between
    messages):

        recv = base + margin * 8 * largest / slowest_bps
        http = base + margin * 8 * min(largest, HTTP_PAYLOAD_BYTES) / slowest_bps
    """
    recv = scaled_timeout_ms(largest_message_bytes, slowest_link_bps, base_s, margin)
    http = scaled_timeout_ms(min(largest_message_bytes, HTTP_PAYLOAD_BYTES), slowest_link_bps, base_s, margin)  # fmt: skip
    return LinkTimeouts(recv, http, int(largest_message_bytes), float(slowest_link_bps))


def largest_tensor_elements(fn, args) -> int:
    """The most elements of any value `fn` computes on `args` (inputs, intermediates inside
    loops and branches, outputs), from its jaxpr: shapes only, nothing is run."""
    import jax

    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.result_type(a)), args)  # fmt: skip
    closed = jax.make_jaxpr(fn)(*abstract)

    def walk(jaxpr) -> int:
        most = max((int(np.prod(v.aval.shape)) for v in jaxpr.invars if hasattr(v.aval, "shape")), default=0)  # fmt: skip
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                if hasattr(v.aval, "shape"):
                    most = max(most, int(np.prod(v.aval.shape)))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                most = max(most, walk(sub))
        return most

    return walk(closed.jaxpr)
