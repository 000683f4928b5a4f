"""The placement interface `runtime.finetune.finetune_on` drives, declared once.

    held = backend.at(party, fn, *args)        fn runs at `party` on its own private values
    value = backend.publish(held)              public metadata (shapes, configs) to everyone
    value = backend.local(held)                the value, if this process is its owner
    backend.expect_inputs(elements)            before the owners share that many elements
    secret = backend.share(held)               the owner's value -> secret shares
    program = backend.compile(program_def)     checked, keyed, cached (`compile.artifacts`)
    outs = backend.execute(program, *args)         an SPU program on shares and public values
    held = backend.reveal_to(party, secret)    a result to one party only
    backend.save_shares(secret, paths)         each party writes its own shares
    secret = backend.load_shares(paths, like)  and reads them back (resume)

Two backends meet it: `runtime.sim_backend.SimBackend` (every party in this process, SPU
parties as threads) and `runtime.cluster_backend.ClusterBackend` (SecretFlow, one process
per party). Both compile every program through `compile.artifacts` (its visibility
checks and cache key) and refuse a run whose arguments are not shared as compiled
(`compile.visibility.check_arguments`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    kind: str  # "sim" or "cluster"
    me: str | None  # this process's party; None where one process plays every party
    preset: Any  # compile.protocols.ProtocolPreset
    cost: Any  # a running communication total, or None where the links cannot be read

    def at(self, party: str, fn: Callable, *args: Any, num_returns: int = 1) -> Any: ...
    def publish(self, held: Any) -> Any: ...
    def local(self, held: Any) -> Any: ...
    def expect_inputs(self, elements: int) -> None: ...
    def share(self, held: Any) -> Any: ...
    def compile(self, program: Any) -> Any: ...
    def execute(self, program: Any, *args: Any) -> tuple: ...
    def reveal_to(self, party: str, secret: Any) -> Any: ...
    def save_shares(self, secret: Any, paths: dict[str, Path]) -> None: ...
    def load_shares(self, paths: dict[str, Path], like: Any) -> Any: ...


__all__ = ["Backend"]
