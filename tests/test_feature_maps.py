"""Feature maps and random feature attention (RFA): accuracy bounds and masking."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.models import attention
from secfwt_jax.models.attention import (
    random_feature_attention,
    rfa_features,
    scores_first,
    softmax_attention,
)
from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.models.feature_maps import (
    l2_normalize,
    num_doublings,
    poly_error_bound,
    poly_sin_cos,
    random_directions,
    stacked_powers,
    trig_features,
)

# float32 evaluation adds rounding on top of the float64 bound (values <= 1, ~10 ops).
F32_SLACK = 2e-5


@pytest.mark.parametrize(("bound", "degree"), [(3.5, 6), (10.0, 6), (16.0, 6), (8.0, 8)])
def test_poly_sin_cos_error_within_documented_bound(bound, degree):
    documented = poly_error_bound(bound, degree)
    assert documented < 1e-4
    t = np.linspace(-bound, bound, 10001).astype(np.float32)
    sin, cos = poly_sin_cos(jnp.asarray(t), bound=bound, degree=degree)
    err = max(
        np.max(np.abs(np.asarray(sin) - np.sin(t))), np.max(np.abs(np.asarray(cos) - np.cos(t)))
    )
    assert err <= documented + F32_SLACK


def test_poly_sin_cos_clips_outside_its_range():
    bound = 3.5
    t = jnp.asarray([-100.0, -3.6, 3.6, 50.0])
    sin, cos = poly_sin_cos(t, bound=bound, degree=6)
    edge = np.array([-bound, -bound, bound, bound])
    tol = poly_error_bound(bound, 6) + F32_SLACK
    np.testing.assert_allclose(np.asarray(sin), np.sin(edge), atol=tol)
    np.testing.assert_allclose(np.asarray(cos), np.cos(edge), atol=tol)


def test_stacked_powers_are_the_powers_in_log_depth():
    x = jnp.asarray([0.5, -0.9, 1.0])
    powers = np.asarray(stacked_powers(x, 7))
    np.testing.assert_allclose(
        powers, np.stack([np.asarray(x) ** p for p in range(1, 8)]), rtol=1e-6
    )


@pytest.mark.parametrize(("bound", "degree", "expected"), [(1.0, 6, 0), (9.79, 6, 3), (9.79, 8, 2), (16.0, 8, 3)])  # fmt: skip
def test_num_doublings_is_the_fewest_within_tolerance(bound, degree, expected):
    from secfwt_jax.models.feature_maps import TRIG_TOLERANCE, _doubled_error

    r = num_doublings(bound, degree)
    assert r == expected
    assert _doubled_error(bound, degree, r) <= TRIG_TOLERANCE
    assert r == 0 or _doubled_error(bound, degree, r - 1) > TRIG_TOLERANCE


def test_l2_poly_features_need_no_clip_and_match_exact():
    # |w^T x| <= max_j |w_j| for |x| <= 1, so the polynomial covers every argument.
    rng = np.random.default_rng(0)
    x = l2_normalize(jnp.asarray(rng.normal(size=(2, 9, 3, 16)) * 4, jnp.float32))
    w = jnp.asarray(random_directions(0, 0, 3, 16, 32, sigma=0.5))
    bound = float(np.linalg.norm(np.asarray(w), axis=1).max())
    assert bound > 8  # sigma 0.5: well beyond a fixed clip range such as 3.5
    exact = trig_features(x, w, trig="exact")
    poly = trig_features(x, w, trig="poly", degree=6)
    tol = (poly_error_bound(bound, 6) + F32_SLACK) / np.sqrt(32)
    np.testing.assert_allclose(np.asarray(poly), np.asarray(exact), atol=tol)


VARIANTS = {
    "l2_exact": AttentionConfig(kind="rfa", variant="l2", num_features=32),
    "l2_poly": AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=32),
    # 2m = 4 features < head_dim 8: padding is masked on phi(k), not on v
    "l2_poly_narrow": AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=2),
    "softmax_kernel_poly": AttentionConfig(
        kind="rfa", variant="softmax_kernel", trig="poly", num_features=32
    ),
    "softmax_kernel_exact": AttentionConfig(kind="rfa", variant="softmax_kernel", num_features=32),
    "positive": AttentionConfig(kind="rfa", variant="positive", num_features=32),
}


def _qkv(seed: int, batch=2, seq=7, heads=2, dim=8, scale=0.5):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.normal(size=(batch, seq, heads, dim)) * scale, jnp.float32) for _ in "qkv"
    ]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rfa_padded_keys_have_no_influence(name, causal):
    cfg = VARIANTS[name]
    q, k, v = _qkv(1)
    mask = jnp.asarray(np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.float32))
    base = random_feature_attention(q, k, v, mask, cfg, layer=0, causal=causal)
    pad = (1 - mask)[:, :, None, None]
    noise_k, noise_v = (jnp.asarray(np.random.default_rng(2).normal(size=k.shape) * 3, jnp.float32) for _ in "kv")  # fmt: skip
    moved = random_feature_attention(
        q, k + pad * noise_k, v + pad * noise_v, mask, cfg, 0, causal=causal
    )
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(moved)[real], np.asarray(base)[real], atol=1e-5)
    assert not np.allclose(np.asarray(k + pad * noise_k), np.asarray(k))  # the pads did change
    # The same as zeroing the padded keys' features (`rfa_features`) with a ones column.
    phi_q, phi_k = rfa_features(q, k, mask, cfg, 0)
    v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,))], axis=-1)
    if causal:
        out = jnp.einsum("bnhf,bnhfd->bnhd", phi_q, jnp.cumsum(jnp.einsum("bnhf,bnhd->bnhfd", phi_k, v1), axis=1))  # fmt: skip
    else:
        out = jnp.einsum("bnhf,bhfd->bnhd", phi_q, jnp.einsum("bnhf,bnhd->bhfd", phi_k, v1))
    by_hand = np.asarray(out[..., :-1] / out[..., -1:])
    np.testing.assert_allclose(np.asarray(base)[real], by_hand[real], rtol=1e-4, atol=1e-5)


def test_scores_first_goes_by_outputs_per_head():
    assert scores_first(16, 16, 64, 33)  # MiniLM at 16 tokens: 256 < 2,112
    assert not scores_first(128, 128, 128, 65)  # BERT-base at 128: 16,384 > 8,320
    assert not scores_first(46, 46, 64, 33)  # 2,116 > 2,112


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rfa_both_product_orders_give_the_same_attention(name, monkeypatch):
    q, k, v = _qkv(4)
    mask = jnp.asarray(np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.float32))
    outs = {}
    for first in (True, False):
        monkeypatch.setattr(attention, "scores_first", lambda *_, first=first: first)
        outs[first] = np.asarray(random_feature_attention(q, k, v, mask, VARIANTS[name], 0))
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["softmax_kernel", "positive"])
def test_rfa_with_many_features_approaches_softmax(variant):
    # Unbiased kernel estimates: error ~ 1/sqrt(m). Fixed seed; generous tolerances.
    q, k, v = _qkv(3, batch=1, seq=16, heads=2, dim=16, scale=0.6)
    mask = jnp.ones((1, 16), jnp.float32)
    exact = np.asarray(softmax_attention(q, k, v, mask))

    def rel_err(m):
        cfg = AttentionConfig(kind="rfa", variant=variant, num_features=m, seed=5)
        out = np.asarray(random_feature_attention(q, k, v, mask, cfg, layer=0))
        return np.linalg.norm(out - exact) / np.linalg.norm(exact)

    small, large = rel_err(16), rel_err(8192)
    assert large < 0.1
    assert large < small / 3


def test_rfa_poly_matches_exact_trig_attention():
    q, k, v = _qkv(4)
    mask = jnp.ones((2, 7), jnp.float32)
    for variant in ("l2", "softmax_kernel"):
        cfg = AttentionConfig(kind="rfa", variant=variant, num_features=32)
        exact = random_feature_attention(q, k, v, mask, cfg, 0)
        poly = random_feature_attention(q, k, v, mask, dataclasses.replace(cfg, trig="poly"), 0)
        np.testing.assert_allclose(np.asarray(poly), np.asarray(exact), atol=1e-3)


def test_every_layer_runs_the_same_trig_program():
    # Each layer's own bound max_j |w_j| varies by ~10%, across the thresholds of one
    # more doubling; the shared bound gives every layer the same ops (and cost), which
    # the bench's layer extrapolation assumes.
    from secfwt_jax.compile import compiler
    from secfwt_jax.models.feature_maps import cheapest_degree, direction_bound, max_norm

    cfg = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=64)
    own = [max_norm(random_directions(0, layer, 1, 64, 64, 1.0)) for layer in range(48)]
    lo, hi = int(np.argmin(own)), int(np.argmax(own))
    assert cheapest_degree(own[lo]) != cheapest_degree(own[hi]) or num_doublings(own[lo], 8) != num_doublings(own[hi], 8)  # fmt: skip
    x = np.random.default_rng(0).normal(size=(1, 4, 1, 64)).astype(np.float32)
    mask = np.ones((1, 4), np.float32)
    texts = [compiler.compile_to_pphlo(lambda q, k, layer=layer: rfa_features(q, k, mask, cfg, layer), (x, x)).pphlo_text for layer in (lo, hi)]  # fmt: skip
    assert texts[0].count("pphlo.multiply") == texts[1].count("pphlo.multiply")
    assert direction_bound(0, 1, 64, 64, 1.0) == max(own)
    assert (
        cheapest_degree(max(own)) == 10
        and cheapest_degree(direction_bound(0, 12, 32, 32, 1.0)) == 8
    )
