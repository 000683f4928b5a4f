"""Persistent SPU session, constant hoisting, precision rewrites and cluster guard."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from secfwt_jax.compile import compiler, protocols, simulator
from secfwt_jax.compile.simulator import SimulatorSession


def test_constant_operand_of_batched_einsum_is_exact():
    # spu 0.9.3b0 miscompiles this einsum when w is baked in as a constant (errors ~7);
    # compile_to_pphlo hoists w into a public input, which is exact.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4)).astype(np.float32)
    w = rng.standard_normal((2, 4, 5)).astype(np.float32)

    def f(x):
        return jnp.einsum("nhd,hdm->nhm", x, w)

    comp = compiler.compile_to_pphlo(f, (x,))
    assert len(comp.constants) == 1 and comp.constants[0].shape == (2, 4, 5)
    types = compiler.pphlo_input_types(comp.pphlo_text)
    assert "!pphlo.secret" in types[0] and "!pphlo.secret" not in types[1]
    got = simulator.mpc_execute(f, (x,), preset=protocols.preset("SEMI2K")).outputs
    np.testing.assert_allclose(got, np.einsum("nhd,hdm->nhm", x, w), atol=1e-3)


def test_tanh_rewrite_is_accurate_and_spu_tanh_is_not():
    x = np.linspace(-9, 9, 121).astype(np.float32)
    p = protocols.preset("SEMI2K")  # default rewrites include tanh_exp
    got = simulator.mpc_execute(jnp.tanh, (x,), preset=p).outputs
    assert np.abs(got - np.tanh(x)).max() < 1e-4
    raw = protocols.preset("SEMI2K", rewrites=())
    got_raw = simulator.mpc_execute(jnp.tanh, (x,), preset=raw).outputs
    assert np.abs(got_raw - np.tanh(x)).max() > 1e-3  # why the rewrite exists


def _step(theta, x, lr):
    loss = jnp.mean((x @ theta) ** 2)
    return theta - lr * theta, {"loss": loss}


@pytest.mark.parametrize("name", ["SEMI2K", "ABY3"])
def test_session_keeps_values_shared_across_runs(name):
    rng = np.random.default_rng(1)
    theta = rng.standard_normal((4, 3)).astype(np.float32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    lr = np.float32(0.1)
    comp = compiler.compile_to_pphlo(_step, (theta, x, lr), public={2})
    s = SimulatorSession(protocols.preset(name), profile=True)
    s.put("theta", theta)
    s.put("x", x)
    s.put("lr", lr, public=True)
    want = theta
    for _ in range(3):
        cost = s.execute(comp, ["theta", "x", "lr"], ["theta", "info"])
        want = want - lr * want
    assert cost.total_bytes > 0 and len(cost.per_party_bytes) == protocols.WORLD_SIZE[name]
    np.testing.assert_allclose(s.reveal("theta"), want, atol=1e-3)
    np.testing.assert_allclose(s.reveal("info")["loss"], np.mean((x @ want / 0.9) ** 2), rtol=1e-2)
    with pytest.raises(KeyError, match="nope"):
        s.reveal("nope")
    with pytest.raises(ValueError, match="input_names"):
        s.execute(comp, ["theta", "x"], ["theta", "info"])


def test_cluster_refuses_trusted_first_party_beaver():
    with pytest.raises(ValueError, match="SEMI2K"):
        protocols.check_cluster_allowed(protocols.preset("SEMI2K"), allow_insecure_beaver=False)
    protocols.check_cluster_allowed(protocols.preset("SEMI2K"), allow_insecure_beaver=True)
    protocols.check_cluster_allowed(protocols.preset("ABY3"))
    protocols.check_cluster_allowed(protocols.preset("SEMI2K", beaver_type="TrustedThirdParty"))
    with pytest.raises(ValueError, match="beaver_type"):
        protocols.preset("SEMI2K", beaver_type="Dealer")
    with pytest.raises(ValueError, match="rewrites"):
        protocols.preset("ABY3", rewrites=("fast_tanh",))


def test_probabilistic_truncation_is_semi2k_s_cheaper_product_on_both_backends():
    """`protocol.truncation: probabilistic` reaches SPU (simulator and cluster config): a
    SEMI2K product then costs 32 B and 1 round per element instead of 48 B and 2. Small
    values: the failure rate at |x y| < 3 is about 1e-8 per product (trunc_failure.py)."""
    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster import loopback_cluster
    from secfwt_jax.runtime.cluster_run import _cluster_for

    n = 4096
    a = np.linspace(-3, 3, n, dtype=np.float32)
    b = np.full(n, 0.5, np.float32)
    costs = {}
    for truncation in ("exact", "probabilistic"):
        preset = protocols.preset("SEMI2K", truncation=truncation)
        assert protocols.runtime_config(preset).trunc_allow_msb_error == (truncation == "probabilistic")  # fmt: skip
        res = simulator.mpc_execute(lambda x, y: x * y, (a, b), preset=preset, profile=True)
        np.testing.assert_allclose(res.outputs, a * b, atol=1e-4)
        costs[truncation] = (res.cost.total_bytes / n, res.cost.max_rounds)
    assert costs == {"exact": (48.0, 2), "probabilistic": (32.0, 1)}
    with pytest.raises(ValueError, match="truncation: probabilistic is SEMI2K's option"):
        protocols.preset("ABY3", truncation="probabilistic")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    semi2k = [
        "protocol.name=SEMI2K",
        "parties.compute=[alice, bob]",
        "protocol.allow_insecure_beaver=true",
    ]
    spec = load_spec(tiny, [*semi2k, "protocol.truncation=probabilistic"])
    cluster = _cluster_for(spec, loopback_cluster(("alice", "bob"), protocol="SEMI2K"))
    assert cluster.spu_runtime_config()["trunc_allow_msb_error"] is True


def test_a_cluster_file_cannot_change_what_the_spec_decides():
    """Each party reads its own cluster file: a ``spu_runtime_extra`` key that the spec
    decides (here SEMI2K's truncation and Beaver source) may repeat the spec's value but
    not change it, or one party would truncate probabilistically while the spec, the
    handshake and the other parties say exact."""
    import dataclasses

    from secfwt_jax.run.spec import load_spec
    from secfwt_jax.runtime.cluster import loopback_cluster
    from secfwt_jax.runtime.cluster_run import _cluster_for

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    semi2k = ["protocol.name=SEMI2K", "parties.compute=[alice, bob]", "protocol.allow_insecure_beaver=true"]  # fmt: skip
    exact = load_spec(tiny, semi2k)
    base = loopback_cluster(("alice", "bob"), protocol="SEMI2K")
    with_extra = lambda **kw: dataclasses.replace(base, spu_runtime_extra=kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"spu_runtime_extra.trunc_allow_msb_error is True, but the spec's protocol.truncation makes it False"):  # fmt: skip
        _cluster_for(exact, with_extra(trunc_allow_msb_error=True))
    with pytest.raises(ValueError, match=r"spu_runtime_extra.beaver_type is 'MultiParty'.*protocol.beaver_type"):  # fmt: skip
        _cluster_for(exact, with_extra(beaver_type="MultiParty"))
    kept = _cluster_for(exact, with_extra(trunc_allow_msb_error=False, link_recv_timeout_ms=5))
    config = kept.spu_runtime_config()
    assert config["trunc_allow_msb_error"] is False and config["beaver_type"] == "TrustedFirstParty"
    assert config["link_recv_timeout_ms"] == 5 and config["fxp_fraction_bits"] == 18
    probabilistic = load_spec(tiny, [*semi2k, "protocol.truncation=probabilistic"])
    assert _cluster_for(probabilistic, with_extra(trunc_allow_msb_error=True)).spu_runtime_config()["trunc_allow_msb_error"] is True  # fmt: skip
