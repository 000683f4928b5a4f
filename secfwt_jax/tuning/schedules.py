"""Step-size schedules. optax is used only here: the step size is a public scalar that the
host evaluates per step and feeds to the (MPC) step as a public input."""

from __future__ import annotations

import dataclasses
from typing import Literal

import optax

ScheduleKind = Literal["constant", "linear", "cosine"]


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """kind: constant | linear (decay to end_fraction * peak) | cosine; warmup_steps: linear
    warmup from 0 to peak before the main schedule."""

    kind: ScheduleKind = "constant"
    peak: float = 1e-3
    total_steps: int = 100
    warmup_steps: int = 0
    end_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule.kind: unknown {self.kind!r}")
        if not self.peak > 0:
            raise ValueError("schedule.peak: must be positive")
        if self.total_steps < 1:
            raise ValueError("schedule.total_steps: must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError("schedule.warmup_steps: must be in [0, total_steps]")


def make_schedule(cfg: ScheduleConfig) -> optax.Schedule:
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    end = cfg.peak * cfg.end_fraction
    if cfg.kind == "constant":
        main = optax.constant_schedule(cfg.peak)
    elif cfg.kind == "linear":
        main = optax.linear_schedule(cfg.peak, end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(cfg.peak, decay_steps, alpha=cfg.end_fraction)
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])
