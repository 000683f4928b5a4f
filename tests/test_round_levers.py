"""The round levers of docs/cost.md, section 8.

1. The bucketed reciprocal, rsqrt and log (`mpc_ops.reciprocal_pow2`, `rsqrt_pow2`,
   `log_pow2`): plaintext accuracy, saturation outside the range, the sign, gradients,
   MPC equals plaintext, and about half SPU's rounds; the cross-entropy built on them.
   ABY3 FM64 per element over a 40-bucket range: reciprocal 29.3 rounds against SPU's
   58.7 (its reciprocal plus the project's Newton step), rsqrt 32.3 against 60.0.
2. The radix-4 max (`mpc_ops.max_last_axis`): 16 keys 25.3 rounds against 42.7.
3. The `packed_batch_dot` rewrite: a vmapped matmul in one matmul's rounds, same values.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import profiler, protocols
from secfwt_jax.compile.simulator import mpc_execute
from secfwt_jax.models.classifier import cross_entropy
from secfwt_jax.models.mpc_ops import (
    divide_pow2,
    log_pow2,
    max_last_axis,
    reciprocal_pow2,
    refined_reciprocal,
    refined_rsqrt,
    rsqrt_pow2,
)

ULP = 2.0**-18


def _log_grid(lo, hi, n=20001):
    return np.exp(np.linspace(lo * np.log(2), hi * np.log(2), n, endpoint=False)).astype(np.float32)  # fmt: skip


@pytest.mark.parametrize("lo, hi", [(-16, 24), (-8, 8), (0, 6), (-16, 32)])
def test_plaintext_error_is_float32_rounding(lo, hi):
    """The quadratic start and the series leave ~1e-8; what remains is float32's own."""
    x = _log_grid(lo, hi)
    xd = x.astype(np.float64)
    rec = np.asarray(jax.jit(lambda v: reciprocal_pow2(v, lo, hi))(x), np.float64)
    rsq = np.asarray(jax.jit(lambda v: rsqrt_pow2(v, lo, hi))(x), np.float64)
    lg = np.asarray(jax.jit(lambda v: log_pow2(v, lo, hi))(x), np.float64)
    assert np.abs(rec * xd - 1).max() < 5e-7
    assert np.abs(rsq * np.sqrt(xd) - 1).max() < 5e-7
    # 1.4e-6 from q, plus float32's rounding of |log x| up to 25
    assert np.all(np.abs(lg - np.log(xd)) < 1.6e-6 + 1.2e-7 * np.abs(np.log(xd)))


def test_scale_is_folded_in():
    x = _log_grid(-4, 20, 2001)
    got = np.asarray(rsqrt_pow2(x, -4, 20, scale=19.6), np.float64)
    np.testing.assert_allclose(got, 19.6 / np.sqrt(x.astype(np.float64)), rtol=5e-7)


def test_saturates_outside_the_range_instead_of_extrapolating():
    below = np.array([2.0**-17, 1e-9, 0.0, -1e-3, -7.0], np.float32)
    above = np.array([2.0**24, 3e7, 1e9], np.float32)
    np.testing.assert_allclose(reciprocal_pow2(below, -16, 24), 2.0**16, rtol=1e-6)
    np.testing.assert_allclose(reciprocal_pow2(above, -16, 24), 2.0**-24, rtol=1e-6)
    np.testing.assert_allclose(rsqrt_pow2(below, -16, 32), 2.0**8, rtol=1e-6)
    np.testing.assert_allclose(log_pow2(np.array([0.1, 0.0, -3.0], np.float32), -1, 3), -np.log(2), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(log_pow2(np.array([8.0, 100.0], np.float32), -1, 3), 3 * np.log(2), rtol=1e-6)  # fmt: skip


def test_signed_reciprocal_is_odd():
    x = np.concatenate([_log_grid(-16, 12, 4001), -_log_grid(-16, 12, 4001)])
    got = np.asarray(reciprocal_pow2(x, -16, 12, signed=True), np.float64)
    assert np.abs(got * x.astype(np.float64) - 1).max() < 5e-7
    # |x| < 2^lo saturates to +2^-lo whatever the sign; unsigned, a negative x saturates too
    tiny = np.array([0.0, 1e-7, -1e-7], np.float32)
    np.testing.assert_allclose(reciprocal_pow2(tiny, -16, 12, signed=True), 2.0**16, rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(reciprocal_pow2(-x[:3], -16, 12), 2.0**16, rtol=1e-6)


def test_gradients_are_those_of_the_functions():
    """Backprop (the SFT baseline) differentiates through them: the buckets are constants,
    the polynomial and series carry d/dx."""
    x = _log_grid(-6, 10, 257)
    g_rec = jax.vmap(jax.grad(lambda v: reciprocal_pow2(v, -8, 12)))(x)
    g_rsq = jax.vmap(jax.grad(lambda v: rsqrt_pow2(v, -8, 12)))(x)
    g_log = jax.vmap(jax.grad(lambda v: log_pow2(v, -8, 12)))(x)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(g_rec), -1 / xd**2, rtol=3e-5)
    np.testing.assert_allclose(np.asarray(g_rsq), -0.5 * xd**-1.5, rtol=3e-5)
    # q's equioscillating 1.4e-6 error has a slope: 2.2e-4 relative, measured
    np.testing.assert_allclose(np.asarray(g_log), 1 / xd, rtol=5e-4)


@pytest.fixture(scope="module")
def positives():
    rng = np.random.default_rng(0)
    return np.exp(rng.uniform(np.log(0.05), np.log(2000.0), 512)).astype(np.float32)


CASES = {
    "reciprocal": (lambda v: reciprocal_pow2(v, -16, 24), lambda v: 1 / v),
    "reciprocal_signed": (lambda v: reciprocal_pow2(v, -16, 12, signed=True), lambda v: 1 / v),
    "rsqrt": (lambda v: rsqrt_pow2(v, -16, 32), lambda v: v**-0.5),
    "rsqrt_scaled": (lambda v: rsqrt_pow2(v, -16, 32, scale=19.6), lambda v: 19.6 * v**-0.5),
}


@pytest.mark.parametrize("protocol", ["ABY3", "SEMI2K"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_under_mpc_equals_plaintext(name, protocol, positives):
    """Within a few ulps of 18 fraction bits of the true value (plus 1e-4 relative):
    fixed point's resolution, as for SPU's own reciprocal and rsqrt."""
    fn, true = CASES[name]
    x = positives
    if name.endswith("signed"):
        x = np.where(np.arange(x.size) % 2 == 0, x, -x).astype(np.float32)
    got = mpc_execute(fn, (x,), preset=protocols.preset(protocol)).outputs
    want = true(x.astype(np.float64))
    assert np.all(np.abs(got - want) <= 1e-4 * np.abs(want) + 6 * ULP)
    plain = np.asarray(jax.jit(fn)(x))
    assert np.all(np.abs(got - plain) <= 1e-4 * np.abs(want) + 6 * ULP)


def test_log_under_mpc_equals_plaintext():
    x = np.exp(np.random.default_rng(1).uniform(0, np.log(255), 512)).astype(np.float32)
    got = mpc_execute(lambda v: log_pow2(v, 0, 8), (x,), preset=protocols.preset("ABY3")).outputs
    assert np.abs(got - np.log(x.astype(np.float64))).max() < 2e-5


def test_about_half_of_spus_rounds_under_aby3(positives):
    aby3 = protocols.preset("ABY3")

    def cost(fn, name):
        return profiler.profile_function(fn, (positives,), (), aby3, name=name)

    rec, spu_rec = cost(lambda v: reciprocal_pow2(v, -16, 24), "rec"), cost(refined_reciprocal, "spu_rec")  # fmt: skip
    rsq, spu_rsq = cost(lambda v: rsqrt_pow2(v, -16, 32), "rsq"), cost(refined_rsqrt, "spu_rsq")
    assert rec.rounds <= 30 and rec.rounds <= 0.55 * spu_rec.rounds
    assert rsq.rounds <= 33 and rsq.rounds <= 0.6 * spu_rsq.rounds
    # A narrow range needs fewer comparisons (bytes) and one normalising product (rounds).
    narrow = cost(lambda v: reciprocal_pow2(v, -8, 14), "narrow")
    assert narrow.total_bytes < 0.7 * rec.total_bytes and narrow.rounds < rec.rounds


def test_cross_entropy_matches_log_softmax_in_fewer_rounds():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (64, 2)).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 64)]
    reference = -np.mean(np.sum(labels * jax.nn.log_softmax(logits), -1))
    assert abs(float(cross_entropy(logits, labels)) - float(reference)) < 2e-5
    many = rng.normal(0, 3, (8, 7)).astype(np.float32)
    many_labels = np.eye(7, dtype=np.float32)[rng.integers(0, 7, 8)]
    ref7 = -np.mean(np.sum(many_labels * jax.nn.log_softmax(many), -1))
    assert abs(float(cross_entropy(many, many_labels)) - float(ref7)) < 2e-5

    aby3 = protocols.preset("ABY3")
    got = mpc_execute(cross_entropy, (logits, labels), preset=aby3).outputs
    assert abs(float(got) - float(reference)) < 1e-4
    cheap = profiler.profile_function(cross_entropy, (logits, labels), (), aby3, name="ce")
    spu = profiler.profile_function(
        lambda z, y: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), -1)),
        (logits, labels),
        (),
        aby3,
        name="ce_spu",  # fmt: skip
    )
    assert cheap.rounds <= 0.85 * spu.rounds  # 104.7 against 128.7: the max and the log


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 33])
def test_max_last_axis_is_the_max_with_ties_and_padding(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(6, 2, n)).astype(np.float32)
    x[0, 0] = 0.25  # all tied
    x[1, 0, : n // 2] = x[1, 0].max()  # tied maxima
    got = np.asarray(jax.jit(max_last_axis)(x))
    np.testing.assert_array_equal(got, x.max(-1, keepdims=True))
    # the gradient reaches exactly one maximum per row
    grad = np.asarray(jax.grad(lambda v: jnp.sum(max_last_axis(v)))(x))
    np.testing.assert_array_equal(grad.sum(-1), 1.0)


def test_max_last_axis_under_mpc_in_fewer_rounds():
    x = np.random.default_rng(0).normal(size=(96, 16)).astype(np.float32)
    aby3 = protocols.preset("ABY3")
    got = mpc_execute(max_last_axis, (x,), preset=aby3).outputs
    assert np.abs(got - x.max(-1, keepdims=True)).max() < 2 * ULP
    ours = profiler.profile_function(max_last_axis, (x,), (), aby3, name="max_r4")
    spu = profiler.profile_function(lambda v: jnp.max(v, -1, keepdims=True), (x,), (), aby3, name="max_spu")  # fmt: skip
    assert ours.rounds <= 26 and ours.rounds <= 0.65 * spu.rounds


def test_packed_batch_dot_rewrite_same_values_fewer_rounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 64)).astype(np.float32)
    w = (rng.normal(size=(2, 64, 96)) * 0.1).astype(np.float32)

    def population(x, w):  # the SPSA population's vmapped weight matmuls
        return jax.vmap(lambda a, b: jnp.tanh(a @ b) @ b.T)(x, w)

    plain = np.asarray(population(x, w))
    runs = {}
    for rewrites in [("tanh_exp", "erf_exp"), ("tanh_exp", "erf_exp", "packed_batch_dot")]:
        p = protocols.preset("ABY3", rewrites=rewrites)
        prof = profiler.profile_function(population, (x, w), (), p, name="pop")
        runs[rewrites[-1]] = (prof, mpc_execute(population, (x, w), preset=p).outputs)
    (loop, loop_out), (packed, packed_out) = runs["erf_exp"], runs["packed_batch_dot"]
    assert packed.total_bytes == loop.total_bytes
    assert packed.rounds <= loop.rounds - 5  # 2 matmuls, one looped matmul's rounds each
    assert np.abs(packed_out - plain).max() < 2e-3 and np.abs(loop_out - plain).max() < 2e-3
    assert "packed_batch_dot" in protocols.preset("ABY3").rewrites


def test_rfa_inverse_choice_trades_rounds_for_bytes_with_the_same_values(tmp_path):
    """`AttentionConfig.inverse`: "bucketed" (fewer rounds) and "spu" (fewer bytes) compute
    the same attention; an adapted checkpoint is accepted for either."""
    import dataclasses
    import json

    from secfwt_jax.models.attention import random_feature_attention
    from secfwt_jax.models.config import AttentionConfig
    from secfwt_jax.run.build import ADAPTATION_FILE, check_adapted_attention
    from secfwt_jax.run.spec import load_spec

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 16, 4, 16)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 16), np.float32)
    mask[1, -5:] = 0
    cfgs = {impl: AttentionConfig(kind="rfa", trig="poly", num_features=16, inverse=impl) for impl in ("bucketed", "spu")}  # fmt: skip
    outs, costs = {}, {}
    for impl, cfg in cfgs.items():
        fn = lambda q, k, v, c=cfg: random_feature_attention(q, k, v, mask, c, 0)  # noqa: E731
        outs[impl] = np.asarray(jax.jit(fn)(q, k, v))
        costs[impl] = profiler.profile_function(fn, (q, k, v), (), protocols.preset("ABY3"), name=f"rfa_{impl}")  # fmt: skip
    np.testing.assert_allclose(outs["bucketed"], outs["spu"], atol=2e-6)
    assert costs["bucketed"].rounds <= costs["spu"].rounds - 50
    assert costs["spu"].total_bytes < costs["bucketed"].total_bytes

    (tmp_path / ADAPTATION_FILE).write_text(json.dumps({"attention": dataclasses.asdict(cfgs["spu"])}))  # fmt: skip
    check_adapted_attention(tmp_path, cfgs["bucketed"])  # numerics only: accepted
    check_adapted_attention(
        tmp_path, dataclasses.replace(cfgs["spu"], poly_degree=12)
    )  # so is the degree
    with pytest.raises(ValueError, match=r"^attention.inverse: unknown 'fast'$"):
        AttentionConfig(inverse="fast")
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert load_spec(tiny, ["model.attention.inverse=spu"]).model.attention.inverse == "spu"


@pytest.mark.parametrize("signed", [False, True])
def test_divide_pow2_is_the_quotient_to_1e6_and_one_op_shorter(signed):
    rng = np.random.default_rng(4)
    den = np.exp(rng.uniform(-6, 8, (64, 3, 1))).astype(np.float32)
    if signed:
        den[::2] *= -1
    num = rng.normal(size=(64, 3, 8)).astype(np.float32)
    fn = lambda n, d: divide_pow2(n, d, -16, 12, signed=signed)  # noqa: E731
    want = num.astype(np.float64) / den.astype(np.float64)
    got = np.asarray(jax.jit(fn)(num, den), np.float64)
    assert np.all(np.abs(got - want) <= 1.2e-6 * np.abs(want) + 1e-7)
    aby3 = protocols.preset("ABY3")
    mpc = mpc_execute(fn, (num, den), preset=aby3).outputs
    # fixed point holds den to an ulp: relative ULP / |den| on the quotient, as for SPU's
    bound = (1e-4 + 4 * ULP / np.abs(den)) * np.abs(want) + 8 * ULP * (1 + np.abs(num) / np.abs(den))  # fmt: skip
    assert np.all(np.abs(mpc - want) <= bound)
    two_step = lambda n, d: n * reciprocal_pow2(d, -16, 12, signed=signed)  # noqa: E731
    fused = profiler.profile_function(fn, (num, den), (), aby3, name="div")
    plain = profiler.profile_function(two_step, (num, den), (), aby3, name="mul_recip")
    assert fused.rounds <= plain.rounds - 2
