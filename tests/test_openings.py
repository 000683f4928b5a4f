"""SEMI2K opens a value once for all its products (`compile/openings.py`, SPU's Beaver
cache), and RFA's sin/cos products come in the order that lets it (`TrigSchedule`)."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import protocols
from secfwt_jax.compile.compiler import compile_to_pphlo
from secfwt_jax.compile.openings import cached_operands
from secfwt_jax.compile.precision import CACHE_OPENINGS
from secfwt_jax.compile.simulator import mpc_execute
from secfwt_jax.models import feature_maps as fm

RNG = np.random.default_rng(0)


def powers(s):
    """u = s^2 .. u^5 in the order where each fresh power meets a cached one."""
    u = s * s
    u2 = u * u
    u3 = u2 * u
    u4 = u2 * u2
    return u, u2, u3, u4, u4 * u


def without_cache(preset):
    return dataclasses.replace(preset, cache_openings=False)


def test_semi2k_presets_cache_openings_and_the_others_do_not():
    assert CACHE_OPENINGS in protocols.preset("SEMI2K").rewrites
    assert CACHE_OPENINGS in protocols.preset("SEMI2K", truncation="probabilistic").rewrites
    assert CACHE_OPENINGS not in protocols.preset("ABY3").rewrites
    # a preset built from another's rewrites follows its own protocol
    aby3 = dataclasses.replace(protocols.preset("ABY3"), rewrites=protocols.preset("SEMI2K").rewrites)  # fmt: skip
    assert CACHE_OPENINGS not in aby3.rewrites
    # a study's baseline: the same preset without the pass
    assert CACHE_OPENINGS not in without_cache(protocols.preset("SEMI2K")).rewrites


def test_only_values_with_two_products_are_cached():
    import jax

    closed = jax.make_jaxpr(powers)(np.ones(3, np.float32))
    jaxpr = closed.jaxpr
    names = {v: i for i, v in enumerate(e.outvars[0] for e in jaxpr.eqns)}
    marked = {names[v] for v in cached_operands(jaxpr)}
    # eqn 0 is u (3 products), 1 is u2 (2); u3, u4 and u5 have one product or none
    assert marked == {0, 1}


@pytest.mark.parametrize("truncation", ["exact", "probabilistic"])
def test_each_cached_value_is_opened_once_and_the_values_are_the_same(truncation):
    s = RNG.uniform(-1, 1, (64, 32)).astype(np.float32)
    preset = protocols.preset("SEMI2K", truncation=truncation)
    got = {}
    for name, p in (("cached", preset), ("plain", without_cache(preset))):
        res = mpc_execute(powers, (s,), preset=p, profile=True)
        for out, ref in zip(res.outputs, powers(s), strict=True):
            np.testing.assert_allclose(out, ref, atol=2e-4)
        got[name] = (res.cost.total_bytes / s.size, res.cost.max_rounds)
    truncations = 16 * 5 if truncation == "exact" else 0
    # 5 products open 10 operands without the cache; with it s, u (a square: twice when
    # fresh), u2 and u4 once each, and u2 * u2 nothing: 6 openings of 16 B (two parties)
    assert got["plain"][0] == 10 * 16 + truncations
    assert got["cached"][0] == 6 * 16 + truncations
    assert got["cached"][1] <= got["plain"][1]


def test_a_cached_value_is_dropped_only_after_every_product_that_reads_it():
    """SPU keys its cache by buffer address: a mark dropped early would make the products
    after it open again, one never dropped could serve a later value in the same buffer."""
    s = np.ones((4, 4), np.float32)
    text = compile_to_pphlo(powers, (s,), rewrites=protocols.preset("SEMI2K").rewrites).pphlo_text
    lines = text.splitlines()
    made = [ln for ln in lines if "spu.make_cached_var" in ln]
    dropped = [i for i, ln in enumerate(lines) if "spu.drop_cached_var" in ln]
    assert len(made) == len(dropped) == 2
    for i in dropped:
        var = re.search(r"drop_cached_var\((%\w+)", lines[i]).group(1)
        readers = [j for j, ln in enumerate(lines) if "pphlo.multiply" in ln and re.search(rf"{var}\b", ln)]  # fmt: skip
        assert readers and max(readers) < i


def test_reused_powers_are_the_stacked_powers():
    x = RNG.uniform(-1, 1, (3, 5)).astype(np.float32)
    for k in range(1, 8):
        np.testing.assert_allclose(fm.reused_powers(jnp.asarray(x), k), fm.stacked_powers(x, k), rtol=1e-5)  # fmt: skip


def test_both_trig_schedules_give_the_same_features():
    x = RNG.normal(0, 1, (1, 6, 2, 16)).astype(np.float32)
    w = RNG.normal(0, 1, (2, 16, 8)).astype(np.float32)
    inv = fm.inverse_norm(jnp.asarray(x), impl="spu")
    stacked = fm.trig_features(x, w, trig="poly", row_scale=inv)
    reused = fm.trig_features(x, w, trig="poly", row_scale=inv, schedule="reused")
    np.testing.assert_allclose(reused, stacked, atol=1e-6)


def test_semi2k_features_cost_fewer_bytes_in_the_reused_order_at_the_same_rounds():
    """RFA's feature map, l2 variant, one BERT-base head group at 16 tokens: the reused
    order opens each value once (13 openings an element at degree 10, 2 doublings, against
    the stacked order's 22) and, with CrypTen's local truncation, in the same rounds."""
    x = RNG.normal(0, 1, (1, 16, 2, 64)).astype(np.float32)
    w = np.asarray(fm.random_directions(0, 0, 2, 64, 64, 1.0))

    def features(schedule):
        def fn(x):
            inv = fm.inverse_norm(x, impl="spu")
            return fm.trig_features(x, w, trig="poly", row_scale=inv, bound_at_least=10.78, schedule=schedule)  # fmt: skip

        return fn

    preset = protocols.preset("SEMI2K", truncation="probabilistic")
    ref = np.asarray(features("stacked")(x))
    cost = {}
    for schedule in ("stacked", "reused"):
        res = mpc_execute(features(schedule), (x,), preset=preset, profile=True)
        np.testing.assert_allclose(res.outputs, ref, atol=3e-4)
        cost[schedule] = (res.cost.total_bytes, res.cost.max_rounds)
    assert cost["reused"][1] == cost["stacked"][1]
    assert cost["reused"][0] < 0.7 * cost["stacked"][0]
