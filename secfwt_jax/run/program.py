"""A program: one function a run executes under MPC, with example arguments and, per
argument, a name and a visibility-policy role. `run.build` makes a run's programs;
`compile.artifacts` compiles, checks, keys and stores exactly this type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Role = str | Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class ProgramDef:
    """name: program name ("spsa_step"). fn: a JAX-traceable function of positional
    pytrees. args: example arguments (only shapes/dtypes reach the program; closed-over
    arrays of ``fn`` become hoisted public constants). arg_names: one name per argument.
    roles: per argument, a role of `secfwt_jax.compile.visibility` or
    ``f(leaf_path) -> role``; the role fixes the visibility, and all leaves of one argument
    must share it. description: JSON-ready facts that fix the program besides input shapes
    (model, trainable set, eps, ...); it goes into the cache key and the metadata.
    known_constants: label -> (public role, array) for arrays ``fn`` closes over; a hoisted
    constant equal to one of them gets that role and label in the metadata (else the role
    "constant")."""

    name: str
    fn: Callable
    args: tuple
    arg_names: tuple[str, ...]
    roles: tuple[Role, ...]
    description: dict[str, Any] = dataclasses.field(default_factory=dict)
    known_constants: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.args)
        if len(self.arg_names) != n or len(self.roles) != n:
            raise ValueError(f"program {self.name}: {n} args, {len(self.arg_names)} names, {len(self.roles)} roles")  # fmt: skip


__all__ = ["ProgramDef", "Role"]
