"""What a program computes, bounded before its weights are shared.

SPU computes in fixed point: a value x is the ring element round(x * 2^f). A product of
two such values carries 2f fraction bits until it is truncated, so a product (or a dot
product's sum) is silently wrong once its magnitude passes 2^(k - 1 - 2f): 2^27, about
1.3e8, in FM64 with 18 fraction bits. The input check (`compile.protocols.input_bound`)
bounds each shared value by the square root of that, which keeps one product of two
inputs in range but says nothing of what a network computes from them: weights scaled
by 5000 pass it and then overflow inside the first LayerNorm, and the run ends with
losses of 1e7 and exit 0.

So the model owner, before it shares anything, runs the program's own function in
plaintext on a probe batch (public text of random tokens from the public tokenizer; the
owner never sees the data), makes every product element past the bound (over a safety
margin: the data differ from the probe) NaN, as SPU would make it garbage, and refuses
in one line naming a weight tensor if NaN reaches the outputs (`find_overflow`). A
piecewise activation computes its polynomial far outside its range and then discards it
with a select; the select discards the NaN too, so that is not refused.

This is a measurement on one probe, not a proof over all inputs: it catches weights that
overflow on ordinary text, which is the failure users meet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

#: Primitives whose output is a product carrying 2f fraction bits before truncation.
PRODUCTS = frozenset({"mul", "dot_general", "integer_pow", "conv_general_dilated", "square"})
#: Call-like primitives whose body is walked equation by equation.
_CALLS = {"pjit": "jaxpr", "closed_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "fun_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}  # fmt: skip


def product_bound(ring_bits: int, fraction_bits: int) -> float:
    """The largest magnitude a product may reach before its truncation: 2^(k - 1 - 2f)."""
    return float(2.0 ** (ring_bits - 1 - 2 * fraction_bits))


@dataclasses.dataclass(frozen=True)
class Overflow:
    """A product that overflows on the probe and corrupts the program's outputs."""

    peak: float  # its largest magnitude on the probe
    primitive: str
    source: str  # the weight leaf that most recently entered its data flow


def _leaf_names(args: Sequence[Any], names: Sequence[str | None]) -> list[str | None]:
    out: list[str | None] = []
    for arg, name in zip(args, names, strict=True):
        for path, _ in jax.tree_util.tree_flatten_with_path(arg)[0]:
            out.append(None if name is None else name + jax.tree_util.keystr(path))
    return out


def _run_poisoned(closed, leaves, labels, limit: float, poison: int):
    """Evaluate `closed` one equation at a time. The elements of the first `poison`
    products that pass `limit` become NaN, as SPU would make them garbage. Returns the
    outputs and, per product in evaluation order, (its peak, primitive, source)."""
    products: list[tuple[float, str, str]] = []
    clock = [0]
    untouched = (-1, "")

    def walk(jaxpr, consts, values, sources):
        env, src = {}, {}  # var -> value; var -> (when a weight entered, its name)

        def read(v):
            return v.val if isinstance(v, jax.core.Literal) else env[v]

        def source_of(v):
            return untouched if isinstance(v, jax.core.Literal) else src[v]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var], src[var] = value, untouched
        for var, value, source in zip(jaxpr.invars, values, sources, strict=True):
            env[var], src[var] = value, source
        last_use = {}  # var -> the index of the last equation that reads it
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, jax.core.Literal):
                    last_use[v] = i
        keep = {v for v in jaxpr.outvars if not isinstance(v, jax.core.Literal)}
        for i, eqn in enumerate(jaxpr.eqns):
            clock[0] += 1
            ins = [read(v) for v in eqn.invars]
            raw = [source_of(v) for v in eqn.invars]
            for v in eqn.invars:  # free what no later equation reads: a 30-layer
                if not isinstance(v, jax.core.Literal) and last_use[v] == i and v not in keep:
                    env.pop(v, None)  # forward would otherwise hold every intermediate
            # a weight read straight from the inputs enters the data flow here
            stamped = [(clock[0], s[1]) if s[0] is None else s for s in raw]
            latest = max(stamped, key=lambda s: s[0], default=untouched)
            sub = _CALLS.get(eqn.primitive.name)
            if sub is not None and sub in eqn.params:
                body = eqn.params[sub]
                inner, inner_consts = getattr(body, "jaxpr", body), getattr(body, "consts", ())
                outs, out_src = walk(inner, inner_consts, ins, raw)
            else:
                result = eqn.primitive.bind(*ins, **eqn.params)
                outs = list(result) if eqn.primitive.multiple_results else [result]
                out_src = [latest] * len(outs)
                if eqn.primitive.name in PRODUCTS and jnp.issubdtype(outs[0].dtype, jnp.floating):  # fmt: skip
                    magnitude = jnp.abs(outs[0])
                    peak = float(jnp.max(jnp.where(jnp.isnan(magnitude), 0, magnitude), initial=0))  # fmt: skip
                    if len(products) < poison and peak > limit:
                        outs[0] = jnp.where(magnitude > limit, jnp.nan, outs[0])
                    products.append((peak, eqn.primitive.name, latest[1]))
            for var, value, source in zip(eqn.outvars, outs, out_src, strict=True):
                env[var], src[var] = value, source
        return [read(v) for v in jaxpr.outvars], [source_of(v) for v in jaxpr.outvars]

    sources = [(None, label) if label is not None else untouched for label in labels]
    outputs, _ = walk(closed.jaxpr, closed.consts, leaves, sources)
    return outputs, products


def _corrupted(outputs) -> bool:
    return any(
        bool(jnp.isnan(o).any()) for o in outputs if jnp.issubdtype(jnp.result_type(o), jnp.floating)
    )  # fmt: skip


def find_overflow(
    fn: Callable, args: Sequence[Any], names: Sequence[str | None], limit: float
) -> Overflow | None:
    """Run `fn(*args)` in plaintext and find the first product whose overflow (a magnitude
    past `limit`) reaches the outputs, or None.

    An overflowing element is made NaN, as SPU makes it garbage; NaN then flows on, and a
    select that discards it (a piecewise activation's polynomial far outside its range,
    which the program computes and then drops) discards the NaN too, so only overflow that
    matters reaches the outputs. The product to blame is the shortest prefix of products
    whose poisoning reaches the outputs (a bisection), named by the weight leaf
    (`names[i]` + key path; None: not a weight, such as the probe batch) that entered its
    data flow last."""
    closed = jax.make_jaxpr(fn)(*args)
    leaves = jax.tree_util.tree_leaves(list(args))
    labels = _leaf_names(args, names)
    outputs, products = _run_poisoned(closed, leaves, labels, limit, poison=1 << 62)
    if not _corrupted(outputs):
        return None
    plain, _ = _run_poisoned(closed, leaves, labels, limit, poison=0)
    if _corrupted(plain):  # past float32 itself (inf, then NaN): the first product past limit
        return next((Overflow(*p) for p in products if p[0] > limit), Overflow(float("nan"), "", ""))  # fmt: skip
    low, high = 0, len(products)  # poisoning the first `high` products corrupts the outputs
    while high - low > 1:
        mid = (low + high) // 2
        if _corrupted(_run_poisoned(closed, leaves, labels, limit, poison=mid)[0]):
            high = mid
        else:
            low = mid
    return Overflow(*products[high - 1])


__all__ = ["PRODUCTS", "Overflow", "find_overflow", "product_bound"]
