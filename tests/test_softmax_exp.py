"""The MPC-cheap exp of softmax (`mpc_ops.exp_nonpositive`, `attention.exp: poly`): its
error against exp, its MPC cost against SPU's PADE exp, MPC equals plaintext, and that the
config and the run spec select it.

Figures (docs/cost.md, section 7): relative error <= 1.1e-5 on [-16, 0]; ABY3 FM64 1,004
bytes (all parties) and 35.7 rounds per element against 1,936 bytes and 71 rounds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from secfwt_jax.compile import profiler, protocols
from secfwt_jax.compile.simulator import mpc_execute
from secfwt_jax.models.attention import attend, softmax_attention
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.mpc_ops import EXP_CLIP, exp_nonpositive

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_exp_nonpositive_relative_error_and_clip():
    x = np.concatenate([np.linspace(-EXP_CLIP, 0, 160001), [-0.0, -1e-6]]).astype(np.float32)
    got = np.asarray(jax.jit(exp_nonpositive)(x), np.float64)
    rel = np.abs(got / np.exp(x.astype(np.float64)) - 1)
    assert rel.max() < 2e-5  # 1.08e-5 in float64; float32 evaluation adds rounding
    # Below the clip the value is e^-16 (under half an ulp of 18 fraction bits), never the
    # polynomial's blow-up.
    far = np.array([-16.5, -30.0, -200.0, -1e4], np.float32)
    np.testing.assert_allclose(np.asarray(exp_nonpositive(far)), np.exp(-EXP_CLIP), rtol=2e-5)


@pytest.fixture(scope="module")
def scores():
    """Row-max-subtracted softmax arguments: mostly near 0, a tail below the clip."""
    rng = np.random.default_rng(0)
    return -np.abs(np.concatenate([rng.normal(0, 4, 1536), rng.uniform(0, 40, 512)])).astype(np.float32)  # fmt: skip


def test_exp_nonpositive_costs_about_half_of_spus_exp_under_aby3(scores):
    preset = protocols.preset("ABY3")  # PADE exp, the project default
    cheap = profiler.profile_function(exp_nonpositive, (scores,), (), preset, name="exp_poly")
    spu = profiler.profile_function(jax.numpy.exp, (scores,), (), preset, name="exp_pade")
    assert cheap.total_bytes / scores.size <= 1010 and cheap.rounds <= 36
    assert spu.total_bytes >= 1.8 * cheap.total_bytes
    assert spu.rounds >= 1.7 * cheap.rounds


@pytest.mark.parametrize("protocol", ["ABY3", "SEMI2K"])
def test_exp_nonpositive_under_mpc_equals_plaintext(protocol, scores):
    # The 4 squarings multiply each truncation's error (2^-18) by up to 16: measured 1.4e-4
    # at most, against 8.7e-5 for SPU's PADE exp against exp.
    got = mpc_execute(exp_nonpositive, (scores,), preset=protocols.preset(protocol)).outputs
    want = np.asarray(jax.jit(exp_nonpositive)(scores))
    assert np.abs(got - want).max() < 2e-4
    assert np.abs(got - np.exp(scores.astype(np.float64))).max() < 2e-4


def _qkv(seed=1, batch=2, seq=12, heads=2, dim=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(0, 1.5, (batch, seq, heads, dim)).astype(np.float32) for _ in range(3))
    mask = np.ones((batch, seq), np.float32)
    mask[1, -3:] = 0.0
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_with_the_poly_exp_matches_exact(causal):
    q, k, v, mask = _qkv()
    exact = np.asarray(softmax_attention(q, k, v, mask, causal=causal))
    poly = np.asarray(attend(q, k, v, mask, AttentionConfig(exp="poly"), 0, causal=causal))
    assert 0 < np.abs(poly - exact).max() < 1e-4


def test_softmax_attention_with_the_poly_exp_under_mpc_equals_plaintext():
    q, k, v, mask = _qkv()
    fn = lambda a, b, c, m: softmax_attention(a, b, c, m, exp="poly")  # noqa: E731
    got = mpc_execute(fn, (q, k, v, mask), preset=protocols.preset("ABY3")).outputs
    want = np.asarray(jax.jit(fn)(q, k, v, mask))
    assert np.abs(got - want).max() < 1e-3


def test_config_and_spec_select_the_exp():
    from secfwt_jax.run.spec import SpecError, load_spec

    assert AttentionConfig().exp == "exact"  # the reference (Hugging Face parity)
    with pytest.raises(ValueError, match="^attention.exp: unknown 'fast'"):
        dataclasses.replace(AttentionConfig(), exp="fast")
    # A run spec runs under MPC: "poly" unless it says otherwise, also when it names some
    # attention fields and not exp.
    assert load_spec(TINY).model.attention.exp == "poly"
    assert load_spec(TINY, ["model.attention.kind=softmax"]).model.attention.exp == "poly"
    assert load_spec(TINY, ["model.attention.exp=exact"]).model.attention.exp == "exact"
    with pytest.raises(SpecError, match="^model.attention.exp: ") as info:
        load_spec(TINY, ["model.attention.exp=fast"])
    assert "\n" not in str(info.value)


def test_adapted_checkpoint_check_ignores_exp_only_where_attention_has_no_exp(tmp_path):
    import json

    from secfwt_jax.run.build import ADAPTATION_FILE, check_adapted_attention
    from secfwt_jax.run.spec import SpecError

    rfa = AttentionConfig(kind="rfa", trig="poly", num_features=16, exp="poly")
    (tmp_path / ADAPTATION_FILE).write_text(json.dumps({"attention": dataclasses.asdict(rfa)}))
    check_adapted_attention(tmp_path, dataclasses.replace(rfa, exp="exact"))  # l2: no exp
    kernel = dataclasses.replace(rfa, variant="softmax_kernel")
    (tmp_path / ADAPTATION_FILE).write_text(json.dumps({"attention": dataclasses.asdict(kernel)}))
    with pytest.raises(SpecError, match=r"other attention settings \(exp\)"):
        check_adapted_attention(tmp_path, dataclasses.replace(kernel, exp="exact"))
