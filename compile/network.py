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
