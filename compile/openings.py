"""Open a secret once for all its products: SPU's Beaver cache, placed by a jaxpr pass.

Under SEMI2K a secret product x * y (or matmul) opens x - a and y - b, a Beaver mask of
each operand: 8 bytes per element of each operand per party, half of a product's bytes
with CrypTen's local truncation and two thirds of them with the exact one. SPU 0.9.3 can
keep the opening of a value and its mask (`spu.experimental.make_cached_var`): every later
product with the same value reuses them (the trusted dealer replays the same mask ``a``
with a fresh ``b``), so only the other operand is opened. Reusing the mask of the SAME
value reveals nothing new: x - a is already public to the parties.

The pass (`cache_openings`) marks each value that is an operand of two or more products
in one jaxpr (``mul``, ``dot_general``, ``integer_pow``) right after it is computed, and
drops the mark right after its last use: SPU keys its cache by buffer address, so a mark
left behind could serve a stale opening to a later value in the same buffer. The drop's
output replaces the value from there on, and a program output that was marked is
returned through its drop, so no drop is dead code. Values, rounds and what is trusted
are unchanged; only openings are saved. Protocols without a Beaver cache (ABY3, CHEETAH)
run both intrinsics as the identity, so the pass is only applied for SEMI2K
(`protocols.ProtocolPreset`).

SPU keeps the cached openings (public masked values) in a LevelDB directory
``BeaverCache.<pid>.<address>.<random>`` in the process's working directory while its
context lives, and removes it when the context ends.
"""

from __future__ import annotations

from collections import Counter

from jax import core, lax
from spu.experimental import drop_cached_var, make_cached_var

#: Primitives whose secret operands SEMI2K opens with a Beaver mask.
PRODUCTS = frozenset({lax.mul_p, lax.dot_general_p, lax.integer_pow_p})


def cached_operands(jaxpr: core.Jaxpr) -> dict[core.Var, int]:
    """Var -> index of the last eqn that reads it, for every var that is an operand of
    two or more product eqns of ``jaxpr`` (its own sub-jaxprs are analysed on their own).
    Index ``len(jaxpr.eqns)`` means a program output."""
    products: Counter = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive in PRODUCTS:
            products.update({v for v in eqn.invars if isinstance(v, core.Var)})
    marked = {v for v, n in products.items() if n >= 2}
    last: dict[core.Var, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, core.Var) and v in marked:
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, core.Var) and v in marked:
            last[v] = len(jaxpr.eqns)
    return last


def mark(x):
    """Ask SPU to keep the Beaver opening of ``x`` for its later products."""
    return make_cached_var(x)


def drop(x, *after):
    """Forget the opening of ``x`` once ``after`` is computed; returns ``x``."""
    return drop_cached_var(x, *after)


def schedule(jaxpr: core.Jaxpr) -> tuple[dict[core.Var, int], dict[int, list[core.Var]]]:
    """(var -> last use, eqn index -> vars to drop after it) for `cached_operands`."""
    last = cached_operands(jaxpr)
    drops: dict[int, list[core.Var]] = {}
    for v, i in last.items():
        drops.setdefault(i, []).append(v)
    return last, drops


__all__ = ["PRODUCTS", "cached_operands", "drop", "mark", "schedule"]
