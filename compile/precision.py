"""Compile-time rewrites: swap a JAX primitive for an MPC-accurate (or MPC-cheaper) formula.

SPU's built-in ``tanh`` has an absolute error of about 5e-3 whatever the fraction bits
(measured here, SEMI2K and ABY3, FM64 18 and 24 bits, inputs in [-9, 9]). GPT-2's and
BERT's ``gelu_new`` go through tanh, and that error dominated the MPC-vs-plaintext gap of
the forward pass. The ``"tanh_exp"`` rewrite computes

    tanh(x) = sign(x) (1 - t) / (1 + t),   t = exp(-2 min(|x|, 8))

instead: max error 1.8e-5 with the PADE exp mode (1.9e-3 with SPU's default Taylor exp),
at about 3.7x the bytes of SPU's tanh. The exp argument is never positive, so the exp
cannot overflow the fixed-point range. ``"erf_exp"`` does the same for exact GELU's erf
(Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 in floating point): SPU's erf left 3e-4
relative error in all-MiniLM-L6-v2's FFN, the rewrite 4.3e-5.

A rewrite is applied by re-evaluating the traced jaxpr with an interpreter that replaces
the named primitives, recursing into ``pjit`` and custom-derivative sub-jaxprs; every
other primitive is bound unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np
from jax import core, lax

from secfwt_jax.models.mpc_ops import (
    PRICE_BEAVER,
    PRICE_BEAVER_LOCAL_TRUNCATION,
    PRICE_PER_OUTPUT,
    MatmulPrice,
    packed_matmul,
)

from . import openings


def _tanh_exp(x, **_):
    a = jnp.minimum(jnp.abs(x), 8.0)
    t = jnp.exp(-2.0 * a)
    return jnp.where(x < 0, -1.0, 1.0).astype(x.dtype) * (1.0 - t) * jnp.reciprocal(1.0 + t)


# Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7 on the real line.
_AS_P = 0.3275911
_AS_COEFFS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf_exp(x, **_):
    # exact GELU's erf; SPU's own erf left 3e-4 relative error in MiniLM's FFN (SEMI2K).
    a = jnp.minimum(jnp.abs(x), 4.0)  # erf(4) = 1 - 1.5e-8
    t = jnp.reciprocal(1.0 + _AS_P * a)
    poly = _AS_COEFFS[-1]
    for c in reversed(_AS_COEFFS[:-1]):
        poly = c + t * poly
    y = 1.0 - t * poly * jnp.exp(-a * a)
    return jnp.where(x < 0, -1.0, 1.0).astype(x.dtype) * y


def _packed_batch_dot(lhs, rhs, *, dimension_numbers, precision=None, preferred_element_type=None, price: MatmulPrice = PRICE_PER_OUTPUT, **_):  # fmt: skip
    """A dot_general with batch dimensions as `mpc_ops.packed_matmul`: the same values.

    SPU 0.9.3 runs a batched dot_general as a loop over the batch, one matmul and its
    truncation after another (about 3 rounds each under ABY3). Attention's per-(batch,
    head) products are such products (`mpc_ops.heads_matmul`), and the SPSA step's
    forwards are one vmap over the 2K perturbed parameter sets, so every weight matmul of
    the trunk is one too (batch 2K). Packing them into one 2-D matmul costs one matmul's
    rounds; the price is local work (up to `mpc_ops.PACK_LIMIT` multiply-adds per packed
    product, looped beyond). The layout is the cheapest at the protocol's `price` (the
    rewrite's name says which, `PACKING_REWRITES`): under ABY3 the same bytes as the loop.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if not lb:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    size = lambda x, dims: int(np.prod([x.shape[d] for d in dims], dtype=np.int64))  # noqa: E731
    g, m, k, n = size(lhs, lb), size(lhs, lfree), size(lhs, lc), size(rhs, rfree)
    a = jnp.transpose(lhs, (*lb, *lfree, *lc)).reshape(g, m, k)
    b = jnp.transpose(rhs, (*rb, *rc, *rfree)).reshape(g, k, n)
    out = packed_matmul(a, b, price=price)
    shape = [lhs.shape[d] for d in (*lb, *lfree)] + [rhs.shape[d] for d in rfree]
    out = out.reshape(shape)
    return out if preferred_element_type is None else out.astype(preferred_element_type)


#: The packing rewrites, one per way a protocol prices a secret matmul
#: (`mpc_ops.MatmulPrice`). A preset names "packed_batch_dot" (priced per output, ABY3's
#: way); `protocols.ProtocolPreset` swaps in SEMI2K's own (`packing_rewrite`).
PACKING_PRICES: dict[str, MatmulPrice] = {
    "packed_batch_dot": PRICE_PER_OUTPUT,
    "packed_batch_dot_beaver": PRICE_BEAVER,
    "packed_batch_dot_beaver_local_truncation": PRICE_BEAVER_LOCAL_TRUNCATION,
}
PACKING_REWRITES = tuple(PACKING_PRICES)

#: Rewrite name -> (primitive, replacement). Replacements take the primitive's operands
#: and params and return its (single) result.
REWRITES: dict[str, tuple[core.Primitive, Callable]] = {
    "tanh_exp": (lax.tanh_p, _tanh_exp),
    "erf_exp": (lax.erf_p, _erf_exp),
    **{
        name: (lax.dot_general_p, functools.partial(_packed_batch_dot, price=price))
        for name, price in PACKING_PRICES.items()
    },
}


def packing_rewrite(protocol: str, truncation: str = "exact") -> str:
    """The packing rewrite priced as ``protocol`` pays for a secret matmul: SEMI2K opens
    both operands (Beaver) and truncates the output exactly, or locally
    ("probabilistic"); the others pay per output."""
    if protocol != "SEMI2K":
        return "packed_batch_dot"
    return "packed_batch_dot_beaver_local_truncation" if truncation == "probabilistic" else "packed_batch_dot_beaver"  # fmt: skip


#: Rewrites applied by default: both, because the MPC-equals-plaintext bar needs them for the
#: supported models. Measured (SEMI2K FM64, PADE exp, relative logit gap of the real
#: all-MiniLM-L6-v2, softmax, 2 x 12 tokens): 4.9e-3 without rewrites, 2.9e-4 with
#: "erf_exp"; GPT-2-shaped tiny model (gelu_new): 1.2e-3 without, 4.4e-4 with "tanh_exp".
#: The price is bytes: MiniLM's FFN sublayer 69.8 MB -> 123.4 MB per layer (66 -> 129
#: rounds) at that shape. `rewrites=()` gives the cheaper, less accurate program.
#: (Newton refinements of SPU's rsqrt / reciprocal as global rewrites did not move the
#: gap; the models apply them where they matter, see secfwt_jax/models/mpc_ops.py.)
#: "packed_batch_dot" changes no value (exact zeros off the diagonal blocks), only rounds:
#: MiniLM-shaped SPSA step, docs/cost.md section 8.
DEFAULT_REWRITES: tuple[str, ...] = ("tanh_exp", "erf_exp", "packed_batch_dot")

_SUBJAXPR_PARAM = {"pjit": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}  # fmt: skip


#: Not a primitive swap but a pass (`openings`): each secret operand of two or more
#: products is opened once (SPU's Beaver cache). SEMI2K's presets add it
#: (`protocols.ProtocolPreset`); the other protocols have no Beaver openings to save.
CACHE_OPENINGS = "cache_openings"


def validate(rewrites: Sequence[str]) -> tuple[str, ...]:
    for r in rewrites:
        if r not in REWRITES and r != CACHE_OPENINGS:
            raise ValueError(f"rewrites: unknown {r!r}; expected some of {sorted([*REWRITES, CACHE_OPENINGS])}")  # fmt: skip
    return tuple(rewrites)


def eval_jaxpr_rewritten(jaxpr: core.Jaxpr, consts, *args, rewrites: Sequence[str] = ()):
    """Like ``jax.core.eval_jaxpr`` but with the primitives of ``rewrites`` replaced."""
    rewrites = validate(rewrites)
    table = {REWRITES[r][0]: REWRITES[r][1] for r in rewrites if r in REWRITES}
    cache = CACHE_OPENINGS in rewrites
    if not table and not cache:
        return core.eval_jaxpr(jaxpr, consts, *args)
    return _eval(jaxpr, consts, args, table, cache)


def _eval(jaxpr: core.Jaxpr, consts, args, table, cache: bool = False):
    env: dict = {}
    last, drops = openings.schedule(jaxpr) if cache else ({}, {})
    readers: dict = {}  # marked var -> outputs of the eqns that read it: its drop waits for them

    def read(v):
        return v.val if isinstance(v, core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for v in (*jaxpr.constvars, *jaxpr.invars):
        if v in last:
            env[v] = openings.mark(env[v])
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        prim = eqn.primitive
        sub = _SUBJAXPR_PARAM.get(prim.name)
        if prim in table:
            outs = [table[prim](*invals, **eqn.params)]
        elif sub is not None and sub in eqn.params:
            closed = eqn.params[sub]
            outs = _eval(closed.jaxpr, closed.consts, invals, table, cache)
        else:
            subfuns, params = prim.get_bind_params(eqn.params)
            outs = prim.bind(*subfuns, *invals, **params)
            outs = outs if prim.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = openings.mark(x) if v in last else x
        for v in {v for v in eqn.invars if isinstance(v, core.Var) and v in last}:
            readers.setdefault(v, []).extend(outs)
        for v in drops.get(i, ()):
            env[v] = openings.drop(env[v], *readers.pop(v))
    for v in drops.get(len(jaxpr.eqns), ()):
        env[v] = openings.drop(env[v], *readers.pop(v, ()))
    return [read(v) for v in jaxpr.outvars]


__all__ = ["DEFAULT_REWRITES", "REWRITES", "eval_jaxpr_rewritten"]
