"""Visibility policy and a checker that reads compiled pphlo.

Policy: base weights, data, labels and trainable parameters are SECRET; seeds, step sizes,
random-feature directions, the subspace projection A and hoisted trace constants are
PUBLIC. Inside a program nothing secret may become public: a public-typed SSA value must
never be computed from a secret-typed operand.

`find_declassifications` walks the pphlo SSA text: it records every value's type (function
and block arguments, op results), and flags each op whose result type is public while one
of its operands is secret. Function results are checked the same way via `return`.
"""

from __future__ import annotations

import re

SECRET_ROLES = frozenset({"weights", "trainable", "frozen", "data", "labels", "batch"})
PUBLIC_ROLES = frozenset({"seed", "step_size", "directions", "features", "projection", "constant"})

_ARG = re.compile(r"(%[\w#]+):\s*(tensor<[^>]*(?:<[^>]*>)?[^>]*>)")
_RESULT = re.compile(r"^\s*(%[\w]+)(?::(\d+))?\s*=\s*([\w.]+)(.*)$")
_USE = re.compile(r"%[\w]+(?:#\d+)?")


def is_secret_type(t: str) -> bool:
    return "!pphlo.secret" in t


def role_visibility(role: str) -> str:
    """'secret' or 'public' for an input role; one-line ValueError for unknown roles."""
    if role in SECRET_ROLES:
        return "secret"
    if role in PUBLIC_ROLES:
        return "public"
    raise ValueError(
        f"role: unknown {role!r}; expected one of {sorted(SECRET_ROLES | PUBLIC_ROLES)}"
    )


def find_declassifications(pphlo_text: str) -> list[str]:
    """Lines of ``pphlo_text`` where a public value is computed from a secret one."""
    secret: dict[str, bool] = {}
    leaks = []
    for line in pphlo_text.splitlines():
        for name, typ in _ARG.findall(line):  # func/block arguments
            if "=" not in line.split(name)[0]:
                secret[name] = is_secret_type(typ)
        m = _RESULT.match(line)
        rhs = line.split("=", 1)[1] if m else line
        if m is None and not line.strip().startswith(("return", "pphlo.return")):
            continue
        type_part = rhs.rsplit("->", 1)[-1] if "->" in rhs else rhs.rsplit(":", 1)[-1]
        body = rhs.split(" : ", 1)[0] if " : " in rhs else rhs
        operands = [u.split("#")[0] for u in _USE.findall(body)]
        op_secret = any(secret.get(u, False) for u in operands)
        if m is None:  # return: each returned value's declared type must stay secret
            if op_secret and "tensor" in type_part and not is_secret_type(type_part):
                leaks.append(line.strip())
            continue
        res_secret = is_secret_type(type_part)
        secret[m[1]] = res_secret
        if op_secret and not res_secret and "tensor" in type_part:
            leaks.append(line.strip())
    return leaks


def check_inputs(input_types: list[str], roles: list[str]) -> list[str]:
    """Mismatches between the program's input types and the roles' policy visibility."""
    if len(input_types) != len(roles):
        raise ValueError(f"roles: {len(roles)} roles for {len(input_types)} program inputs")
    bad = []
    for i, (t, role) in enumerate(zip(input_types, roles, strict=True)):
        want = role_visibility(role)
        got = "secret" if is_secret_type(t) else "public"
        if want != got:
            bad.append(f"input {i} ({role}): policy {want}, compiled {got}")
    return bad


def check_arguments(name: str, secret: tuple[bool, ...], shared: list[bool]) -> None:
    """Refuse, in one line, a run whose arguments are not shared as the program was
    compiled: a plaintext value in a secret argument would enter SPU as a public input
    that every party sees; a share in a public one would be opened."""
    if len(secret) != len(shared):
        raise ValueError(f"visibility: {name} takes {len(secret)} arguments, got {len(shared)}")
    for i, (want, got) in enumerate(zip(secret, shared, strict=True)):
        if want and not got:
            raise ValueError(f"visibility: {name} argument {i} is secret, but was given in plaintext (share it first)")  # fmt: skip
        if got and not want:
            raise ValueError(f"visibility: {name} argument {i} is public, but was given as shares")  # fmt: skip
