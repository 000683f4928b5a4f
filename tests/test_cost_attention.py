"""Attention's per-(batch, head) products as one packed matmul: exact, and under SPU the
rounds of one matmul instead of a loop over batch x heads; under ABY3 the same bytes, and
under SEMI2K (which opens both operands) the layout that opens the fewest zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import profiler, protocols
from secfwt_jax.compile.simulator import mpc_execute
from secfwt_jax.models.feature_maps import project, random_directions
from secfwt_jax.models.mpc_ops import (
    LAYOUTS,
    PRICE_BEAVER,
    PRICE_BEAVER_LOCAL_TRUNCATION,
    PRICE_PER_OUTPUT,
    block_diagonal,
    heads_matmul,
    layout_costs,
    pack_group_size,
    packed_layout,
    packed_matmul,
)

RNG = np.random.default_rng(0)


def normal(*shape):
    return RNG.normal(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("limit", [2**27, 1000, 1])
def test_packed_matmul_equals_the_batched_product(limit):
    a, b = normal(6, 5, 4), normal(6, 4, 3)
    np.testing.assert_allclose(packed_matmul(a, b, limit), a @ b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("limit", [2**27, 1000])
def test_every_layout_equals_the_batched_product(layout, limit):
    a, b = normal(6, 5, 4), normal(6, 4, 3)
    got = packed_matmul(a, b, limit, layout=layout)
    np.testing.assert_allclose(got, a @ b, rtol=1e-6, atol=1e-6)


def test_the_layout_is_the_cheapest_at_the_protocol_s_price():
    # per output (ABY3): every layout but "cross" costs the group's S M N outputs
    assert packed_layout(12, 128, 512, 65, PRICE_PER_OUTPUT) == "left"
    # SEMI2K, RFA's key summary at 512 tokens (S = 4: phi(k)^T [128, 512] x [v|1] [512, 65]):
    # the left block-diagonal opens S^2 M K = 1.05 million elements, "cross" none of its zeros
    assert packed_layout(4, 128, 512, 65, PRICE_BEAVER) == "cross"
    # then phi(q) [512, 128] x the summary [128, 65]: the small right operand on the diagonal
    # beats 16 M N truncated outputs; with local truncation outputs are free, so "cross"
    assert packed_layout(4, 512, 128, 65, PRICE_BEAVER) == "right"
    assert packed_layout(4, 512, 128, 65, PRICE_BEAVER_LOCAL_TRUNCATION) == "cross"
    costs = layout_costs(4, 512, 128, 65, PRICE_BEAVER)
    assert costs["right"] == 16 * (4 * 512 * 128 + 16 * 128 * 65) + 16 * 4 * 512 * 65
    with pytest.raises(ValueError, match="layout: unknown 'diagonal'"):
        packed_matmul(normal(2, 3, 4), normal(2, 4, 5), layout="diagonal")


def test_semi2k_packs_the_head_products_without_opening_the_block_diagonal_s_zeros():
    """SEMI2K's Beaver product opens both operands whole: the left block-diagonal of the
    per-output layout would open its S^2 M K elements, zeros included. The preset's
    packing rewrite picks the layout by SEMI2K's price: fewer bytes, the same rounds, the
    same values."""
    phi_k, v1 = normal(1, 16, 4, 8), normal(1, 16, 4, 5)  # RFA's key summary, 4 heads
    spec = "bnhf,bnhd->bhfd"
    for truncation in ("exact", "probabilistic"):
        preset = protocols.preset("SEMI2K", truncation=truncation)
        assert "packed_batch_dot" not in preset.rewrites  # SEMI2K's own packing instead
        heads = profiler.profile_function(lambda a, b: heads_matmul(a, b, spec), (phi_k, v1), (), preset)  # fmt: skip
        a = jnp.einsum("bnhf->bhfn", phi_k).reshape(4, 8, 16)
        b = jnp.einsum("bnhd->bhnd", v1).reshape(4, 16, 5)
        left = profiler.profile_function(lambda x, y: packed_matmul(x, y, layout="left"), (a, b), (), preset)  # fmt: skip
        assert heads.total_bytes < 0.6 * left.total_bytes, (truncation, heads.total_bytes, left.total_bytes)  # fmt: skip
        assert heads.rounds == left.rounds
        got = mpc_execute(lambda x, y: heads_matmul(x, y, spec), (phi_k, v1), preset=preset).outputs
        np.testing.assert_allclose(got, np.einsum(spec, phi_k, v1), atol=2e-3)
    assert protocols.preset("ABY3").rewrites[-1] == "packed_batch_dot"


def test_block_diagonal_places_each_group_s_blocks_on_the_diagonal():
    blocks = normal(2, 3, 4, 5)
    got = np.asarray(block_diagonal(blocks))
    for c in range(2):
        want = np.zeros((4, 3, 15), np.float32)  # rows in (m, s) order
        for i in range(3):
            want[:, i, 5 * i : 5 * i + 5] = blocks[c, i]
        np.testing.assert_array_equal(got[c], want.reshape(12, 15))


def test_packed_matmul_under_spu_multiplies_no_share_by_a_public_mask():
    # the block-diagonal is data movement: no secret x public product (`mixed_mul`), which
    # over the main run's S^2 M K elements was a third of its trunk's wall time
    a, b = normal(6, 5, 4), normal(6, 4, 3)
    run = mpc_execute(packed_matmul, (a, b), preset=protocols.preset("ABY3"), profile=True)
    hal = run.cost.per_section["hal"]
    assert "f_mmul" in hal and "mixed_mul" not in hal
    np.testing.assert_allclose(run.outputs, a @ b, atol=1e-3)


def test_pack_group_size_is_the_largest_divisor_within_the_limit():
    assert pack_group_size(6, 60, 2**27) == 6
    assert pack_group_size(6, 60, 1000) == 3  # 3^2 * 60 = 540 <= 1000 < 4^2 * 60
    assert pack_group_size(7, 60, 1000) == 1  # 7 is prime and 49 * 60 > 1000
    assert pack_group_size(6, 60, 1) == 1


SPECS = ["bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bnhf,bnhd->bhfd", "bnhf,bhfd->bnhd"]
SHAPES = {"b": 2, "h": 3, "q": 5, "k": 5, "d": 4, "n": 5, "f": 6}


@pytest.mark.parametrize("spec", SPECS)
def test_heads_matmul_equals_einsum(spec):
    lhs, rest = spec.split(",")
    rhs = rest.split("->")[0]
    a = normal(*(SHAPES[c] for c in lhs))
    b = normal(*(SHAPES[c] for c in rhs))
    np.testing.assert_allclose(
        heads_matmul(a, b, spec), jnp.einsum(spec, a, b), rtol=1e-5, atol=1e-5
    )


def test_project_equals_the_per_head_einsum():
    x, w = normal(2, 5, 3, 4), random_directions(0, 1, 3, 4, 6, 1.0)
    np.testing.assert_allclose(
        project(x, w), jnp.einsum("bnhd,hdm->bnhm", x, w), rtol=1e-5, atol=1e-5
    )


def test_packed_scores_cost_one_matmul_of_rounds_and_the_same_bytes_under_aby3():
    q, k = normal(2, 8, 6, 4), normal(2, 8, 6, 4)  # 12 (batch, head) products
    preset = protocols.preset("ABY3")
    # SPU's own loop, without the default `packed_batch_dot` rewrite (which packs any
    # batched dot_general the same way; asserted last)
    no_packing = protocols.preset("ABY3", rewrites=("tanh_exp", "erf_exp"))
    spec = "bqhd,bkhd->bhqk"
    einsum = lambda a, b: jnp.einsum(spec, a, b)  # noqa: E731
    looped = profiler.profile_function(einsum, (q, k), (), no_packing)
    packed = profiler.profile_function(lambda a, b: heads_matmul(a, b, spec), (q, k), (), preset)
    assert packed.total_bytes == looped.total_bytes
    assert looped.rounds >= 12 * 2  # the loop: >= 2 rounds per (batch, head)
    assert packed.rounds <= 4
    assert profiler.profile_function(einsum, (q, k), (), preset).rounds <= 4
    got = mpc_execute(lambda a, b: heads_matmul(a, b, spec), (q, k), preset=preset).outputs
    np.testing.assert_allclose(got, jax.jit(lambda a, b: jnp.einsum(spec, a, b))(q, k), atol=1e-3)
