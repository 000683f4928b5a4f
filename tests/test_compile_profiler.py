"""Cost profiler and network model (compile/profiler.py, compile/network.py)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import network, profiler, protocols
from secfwt_jax.compile.cost import OpCost
from secfwt_jax.models.attention import random_feature_attention, softmax_attention
from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig

SEMI2K = protocols.preset("SEMI2K")
ABY3 = protocols.preset("ABY3")
TINY = ModelConfig(
    family="bert", vocab_size=16, hidden_size=8, num_layers=1, num_heads=2,
    intermediate_size=16, max_positions=8, type_vocab_size=2, activation="gelu_new",
)  # fmt: skip


def _small_fn(x, w, z):
    return jnp.tanh(x @ w) * x + z


def _small_args():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(4, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 4)))


def _counts(p: profiler.FunctionProfile) -> tuple:
    ops = {k: (c.bytes, c.sends, c.calls) for k, c in p.per_op.items()}
    return p.total_bytes, p.total_send_actions, tuple(p.per_party_bytes), p.max_rounds, ops


# ----------------------------------------------------------------------- network model


def test_network_estimate_is_compute_plus_bytes_over_bandwidth_plus_rounds_times_latency():
    lan = network.PRESETS["lan"]
    assert (lan.bandwidth_bps, lan.latency_s) == (3e9, 0.8e-3)
    # 3e9 bits = 375e6 bytes -> 1 s; 10 rounds -> 8 ms; compute 0.5 s.
    assert lan.estimate(375e6, 10, 0.5) == pytest.approx(1.508)
    wan = network.get("WAN100")
    assert wan.estimate(12.5e6, 2) == pytest.approx(1.0 + 0.16)
    b = network.PRESETS["wan200"].breakdown(25e6, 3, 1.0)
    assert b["transfer_s"] == pytest.approx(1.0) and b["latency_s"] == pytest.approx(0.12)
    assert b["total_s"] == pytest.approx(2.12)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: network.NetworkModel("x", 0, 1e-3), "bandwidth_bps"),
        (lambda: network.NetworkModel("x", 1e9, -1), "latency_s"),
        (lambda: network.NetworkModel("x", float("nan"), 0), "bandwidth_bps"),
        (lambda: network.PRESETS["lan"].estimate(-1, 0), "bytes"),
        (lambda: network.PRESETS["lan"].estimate(1, 0, -2.0), "compute_s"),
        (lambda: network.get("satellite"), "network"),
    ],
)
def test_network_model_rejects_bad_values_with_one_line_error(make, field):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_link_timeouts_let_the_largest_message_cross_the_slowest_link_three_times_over():
    t = network.link_timeouts(10e6, 10e6, base_s=120.0)  # 10 MB at 10 Mbps: 8 s
    assert t.recv_timeout_ms == 1000 * (120 + 3 * 8)
    assert t.http_timeout_ms == int(
        np.ceil(1000 * (120 + 3 * 8 * network.HTTP_PAYLOAD_BYTES / 10e6))
    )
    assert t.link_desc() == {"recv_timeout_ms": t.recv_timeout_ms, "http_timeout_ms": t.http_timeout_ms}  # fmt: skip
    small = network.link_timeouts(1000, 10e6)
    assert small.recv_timeout_ms == small.http_timeout_ms == 120_003  # a small program: the base
    with pytest.raises(ValueError, match="^slowest_link_bps"):
        network.link_timeouts(1, 0)


def test_the_largest_tensor_is_found_inside_loops_and_bounds_the_message():
    def body(c, x):
        return c + jnp.outer(x, x).sum(), None  # a 300 x 300 intermediate in the loop only

    fn = lambda a: jax.lax.scan(body, 0.0, a)[0]  # noqa: E731
    assert network.largest_tensor_elements(fn, (np.zeros((4, 300), np.float32),)) == 90_000
    assert network.message_bound_bytes(90_000, 8) == 90_000 * 8 * network.RING_ELEMENTS_PER_ELEMENT


# ------------------------------------------------------------------- function profiles


def test_profiling_twice_gives_identical_counts_under_semi2k():
    a = profiler.profile_function(_small_fn, _small_args(), {2}, SEMI2K)
    b = profiler.profile_function(_small_fn, _small_args(), {2}, SEMI2K)
    assert a.total_bytes > 0 and a.total_send_actions > 0
    assert _counts(a) == _counts(b)
    assert a.rounds == a.total_send_actions / 2


def test_a_function_profile_carries_spus_kernel_profiles():
    # the hal and mpc sections (rank 0): what benchmarks/trunk_profile.py ranks by time
    prof = profiler.profile_function(_small_fn, _small_args(), {2}, ABY3)
    mpc = prof.per_section["mpc"]
    assert set(prof.per_section) >= {"hal", "mpc"}
    assert sum(c.bytes for c in mpc.values()) > 0 and all(c.time >= 0 for c in mpc.values())


def test_profiling_twice_gives_identical_totals_under_aby3():
    a = profiler.profile_function(_small_fn, _small_args(), {2}, ABY3)
    b = profiler.profile_function(_small_fn, _small_args(), {2}, ABY3)
    assert a.total_bytes == b.total_bytes > 0
    assert a.total_send_actions == b.total_send_actions
    assert a.rounds == b.rounds == a.total_send_actions / 3
    assert {k: (c.bytes, c.sends) for k, c in a.per_op.items()} == {
        k: (c.bytes, c.sends) for k, c in b.per_op.items()
    }
    d = json.loads(a.to_json())
    assert d["total_bytes"] == a.total_bytes and set(d["estimates_s"]) == set(network.PRESETS)


# ------------------------------------------------------------------ component profiles


@pytest.fixture(scope="module")
def tiny_table():
    clf = Classifier(TINY, HeadConfig(num_labels=2))
    return profiler.profile_components(clf, profiler.StepShape(2, 4), SEMI2K, label="tiny")


def test_every_component_communicates_and_per_layer_counts_scale(tiny_table):
    rows = {r.name: r for r in tiny_table.rows}
    assert tuple(rows) == profiler.COMPONENTS
    for r in tiny_table.rows:  # every component has a secret multiply or non-linearity
        assert r.profile.total_bytes > 0 and r.profile.total_send_actions > 0, r.name
    assert rows["layernorm"].count == 2 and rows["attention"].count == 1
    assert rows["embeddings"].count == rows["loss"].count == 1


def test_residual_is_whole_step_minus_sum_of_parts(tiny_table):
    whole, parts, res = tiny_table.whole_totals(), tiny_table.parts(), tiny_table.residual()
    assert whole["total_bytes"] == tiny_table.whole.total_bytes  # not extrapolated
    for k in parts:
        assert res[k] == pytest.approx(whole[k] - parts[k])
    # The parts cover the step: the residual is a small share of the whole.
    assert abs(res["total_bytes"]) < 0.2 * whole["total_bytes"]
    assert sum(tiny_table.residual_by_op().values()) == res["total_bytes"]
    d = json.loads(tiny_table.to_json())
    assert d["whole_step_extrapolated"] is False and len(d["components"]) == len(
        profiler.COMPONENTS
    )


def _fake(nbytes: int, sends: int) -> profiler.FunctionProfile:
    op = {"pphlo.multiply": OpCost(nbytes, sends, sends, 1, 0.0)}
    return profiler.FunctionProfile("f", "SEMI2K", 2, nbytes, sends, [nbytes], sends, 1.0, op)


def test_whole_step_extrapolates_with_per_layer_parts():
    rows = [
        profiler.ComponentRow("embeddings", 1, _fake(100, 4)),
        profiler.ComponentRow("attention", 6, _fake(10, 2)),
        profiler.ComponentRow("layernorm", 12, _fake(1, 2)),
    ]
    table = profiler.ComponentProfile(
        "t", "SEMI2K", profiler.StepShape(1, 1), {}, 6, 1, rows, _fake(150, 20)
    )
    assert table.extrapolated
    assert table.per_layer()["total_bytes"] == 10 + 2 * 1  # per layer: attention + 2 LN
    whole = table.whole_totals()
    assert whole["total_bytes"] == 150 + 5 * 12
    assert whole["rounds"] == 10 + 5 * (1 + 2)  # rounds = sends / 2 parties
    assert table.residual()["total_bytes"] == whole["total_bytes"] - (100 + 60 + 12)


def test_backprop_baseline_profiles():
    clf = Classifier(TINY, HeadConfig(num_labels=2))
    shape = profiler.StepShape(2, 4)
    fn, args, public = profiler.backprop_step_case(clf, clf.init(0, 4), shape)
    prof = profiler.profile_function(fn, args, public, SEMI2K, name="bp")
    assert prof.total_bytes > 0 and prof.rounds > 0


def test_rfa_attention_sends_fewer_bytes_than_softmax_at_long_sequences():
    n, d = 128, 16
    rng = np.random.default_rng(1)
    qkv = tuple(0.5 * rng.normal(size=(1, n, 1, d)).astype(np.float32) for _ in range(3))
    mask = np.ones((1, n), np.float32)
    rfa = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=d)

    def soft(q, k, v):
        return softmax_attention(q, k, v, mask)

    def feat(q, k, v):
        return random_feature_attention(q, k, v, mask, rfa, layer=0)

    s = profiler.profile_function(soft, qkv, None, SEMI2K, name="softmax_head")
    r = profiler.profile_function(feat, qkv, None, SEMI2K, name="rfa_head")
    assert r.total_bytes < s.total_bytes


def test_step_shape_validates():
    with pytest.raises(ValueError, match="^seq_len"):
        profiler.StepShape(2, 0)
    assert dataclasses.replace(profiler.StepShape(2, 4), num_directions=3).population == 6
