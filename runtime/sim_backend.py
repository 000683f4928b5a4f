"""The embedded backend: every party of a run in one process, SPU parties as threads.

It implements the placement interface that `secfwt_jax.runtime.finetune` drives (the
SecretFlow backend in `secfwt_jax.runtime.cluster_backend` implements the same one; both
meet `secfwt_jax.runtime.backend.Backend`):

    held = backend.at(party, fn, *args)      fn runs at `party` on its own private values
    value = backend.publish(held)            public metadata (shapes, configs) to everyone
    value = backend.local(held)              the value, if this process is its owner
    secret = backend.share(held)             the owner's value -> secret shares
    outs = backend.execute(program, *args)       an SPU program on shares and public values
    held = backend.reveal_to(party, secret)  a result to one party only

Owners' functions run in this process, but the placement is still enforced: a function
placed at one party may not read another party's private value (`PlacementError`), so a
run that works here keeps the data flow it will have on separate hosts. Programs are
compiled once through the disk cache of `compile.artifacts` (the same key every backend
reports) and run in one persistent `SimulatorSession`, so secrets stay shares between runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from secfwt_jax.compile.artifacts import compile_cached, num_outputs, secret_arguments
from secfwt_jax.compile.cost import CommCost
from secfwt_jax.compile.protocols import ProtocolPreset
from secfwt_jax.compile.simulator import SimulatorSession
from secfwt_jax.compile.visibility import check_arguments


class PlacementError(ValueError):
    """A function placed at one party tried to read another party's private value."""


@dataclasses.dataclass(frozen=True)
class Held:
    """A private value of one party."""

    party: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Secret:
    """A value that exists only as shares inside the session, by name."""

    name: str


@dataclasses.dataclass(frozen=True)
class Program:
    """A compiled program and its cache key."""

    name: str
    compiled: Any
    key: str
    cache_hit: bool
    compile_seconds: float
    num_outputs: int
    secret_args: tuple[bool, ...] = ()  # per argument, from the checked artifact


@dataclasses.dataclass
class RunningCost:
    """Cumulative communication of every SPU run so far (bytes over all parties)."""

    total_bytes: int = 0
    max_rounds: int = 0
    per_program: dict = dataclasses.field(default_factory=dict)

    def add(self, name: str, cost: CommCost | None) -> None:
        if cost is None:
            return
        self.total_bytes += cost.total_bytes
        self.max_rounds += cost.max_rounds
        row = self.per_program.setdefault(name, {"runs": 0, "total_bytes": 0, "max_rounds": 0})
        row["runs"] += 1
        row["total_bytes"] += cost.total_bytes
        row["max_rounds"] += cost.max_rounds


class SimBackend:
    """All parties in this process (module doc). `profile` measures bytes and rounds."""

    kind = "sim"

    def __init__(self, preset: ProtocolPreset, cache_dir: str | Path | None = None, profile: bool = True):  # fmt: skip
        self.preset = preset
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.session = SimulatorSession(preset, profile=profile)
        self.cost = RunningCost()
        self.me: str | None = None  # plays every role
        self._count = 0

    # ------------------------------------------------------------------ placement
    def at(self, party: str, fn, *args, num_returns: int = 1):
        values = [self._read(party, a) for a in args]
        out = fn(*values)
        if num_returns == 1:
            return Held(party, out)
        return tuple(Held(party, o) for o in out)

    def _read(self, party: str, arg: Any) -> Any:
        if isinstance(arg, Secret):
            raise PlacementError(f"{party}: a secret-shared value cannot be read in plaintext")
        if isinstance(arg, Held):
            if arg.party != party:
                raise PlacementError(f"{party} cannot read a private value of {arg.party}")
            return arg.value
        return arg

    def expect_inputs(self, elements: int) -> None:
        """The simulator has no links to size for the owners' shares."""

    def publish(self, held: Held) -> Any:
        return held.value

    def local(self, held: Held) -> Any:
        return held.value

    def share(self, held: Held) -> Secret:
        name = self._fresh()
        self.session.put(name, held.value)
        return Secret(name)

    def reveal_to(self, party: str, secret: Secret) -> Held:
        return Held(party, self.session.reveal(secret.name))

    def save_shares(self, secret: Secret, paths: dict[str, Path]) -> None:
        """Each compute party writes its own shares to ``paths[party]`` (ranks in sorted
        party order, as SecretFlow numbers them)."""
        self.session.dump_shares(secret.name, [paths[p] for p in sorted(paths)])

    def load_shares(self, paths: dict[str, Path], like: Any) -> Secret:
        name = self._fresh()
        self.session.load_shares(name, [paths[p] for p in sorted(paths)], like)
        return Secret(name)

    def delete(self, *secrets: Secret) -> None:
        for s in secrets:
            self.session.delete(s.name)

    # ------------------------------------------------------------------ programs
    def compile(self, program) -> Program:
        artifact, hit = compile_cached(program, self.preset, self.cache_dir)
        seconds = 0.0 if hit else float(artifact.metadata["compile_seconds"])
        return Program(program.name, artifact.compiled, artifact.key, hit, seconds, num_outputs(program), secret_arguments(artifact))  # fmt: skip

    def execute(self, program: Program, *args: Any) -> tuple[Secret, ...]:
        held = next((a for a in args if isinstance(a, Held)), None)
        if held is not None:
            raise PlacementError(f"{held.party}'s private value must be shared before SPU reads it")  # fmt: skip
        check_arguments(program.name, program.secret_args, [isinstance(a, Secret) for a in args])  # fmt: skip
        names = []
        for arg in args:
            if isinstance(arg, Secret):
                names.append(arg.name)
            else:  # plain values are public inputs (seeds, directions, step sizes)
                name = self._fresh()
                self.session.put(name, arg, public=True)
                names.append(name)
        outs = [self._fresh() for _ in range(program.num_outputs)]
        cost = self.session.execute(program.compiled, names, outs)
        self.cost.add(program.name, cost)
        for name, arg in zip(names, args, strict=True):
            if not isinstance(arg, Secret):
                self.session.delete(name)
        return tuple(Secret(n) for n in outs)

    def _fresh(self) -> str:
        self._count += 1
        return f"v{self._count}"

    def close(self) -> None:
        pass


__all__ = [
    "Held",
    "PlacementError",
    "Program",
    "RunningCost",
    "Secret",
    "SimBackend",
    "num_outputs",
]
