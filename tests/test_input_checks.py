"""Inputs SPU would silently corrupt are refused where they are shared; a program's inputs
are checked against what it was compiled for; a declassifying program does not compile;
an insecure SEMI2K Beaver source is refused where every cluster session starts."""

import numpy as np
import pytest

from secfwt_jax.compile import compiler, protocols, simulator, visibility
from secfwt_jax.compile.simulator import SimulatorSession, type_shape
from secfwt_jax.run.program import ProgramDef
from secfwt_jax.runtime.cluster import loopback_cluster, sf_party_session

SEMI2K = protocols.preset("SEMI2K")


@pytest.mark.parametrize(
    "value, message",
    [
        (np.array([1.0, np.nan], np.float32), "NaN or inf"),
        (np.array([np.inf], np.float32), "NaN or inf"),
        (
            np.array([1e5], np.float32),
            "exceeds 8192, the input bound of FM64 with 18 fraction bits",
        ),
        (np.array([2**40], np.int64), r"int64 values past 2\^31"),
        (np.array(["a"]), "cannot enter SPU"),
    ],
)
def test_values_spu_would_corrupt_are_refused_when_shared(value, message):
    session = SimulatorSession(SEMI2K)
    with pytest.raises(ValueError, match=message) as info:
        session.put("theta", {"w": value})
    assert str(info.value).startswith("theta['w']") and "\n" not in str(info.value)
    session.put("ok", {"w": np.array([8000.0, -3.5], np.float32)})  # within the bound


def test_the_bound_follows_the_ring_and_fraction_bits():
    assert protocols.input_bound(protocols.preset("ABY3")) == 8192
    assert protocols.input_bound(protocols.preset("ABY3", fxp_fraction_bits=16)) == 2**15
    assert protocols.input_bound(protocols.preset("ABY3", "FM128")) > 1e10


def test_one_shot_runs_check_their_inputs_too():
    with pytest.raises(ValueError, match="input 0: NaN"):
        simulator.mpc_execute(lambda x: x * 2, (np.array([np.nan], np.float32),), preset=SEMI2K)


def _double():
    x = np.zeros((2, 3), np.float32)
    return compiler.compile_to_pphlo(lambda a: a * 2, (x,), public=None, name="double")


def test_a_public_value_fed_to_a_secret_input_is_refused():
    session = SimulatorSession(SEMI2K)
    session.put("x", np.ones((2, 3), np.float32), public=True)
    with pytest.raises(ValueError, match="x: put as public, but the program reads input 0 as secret"):  # fmt: skip
        session.execute(_double(), ["x"], ["y"])


def test_a_shape_mismatch_is_one_line_not_a_cpp_stack():
    session = SimulatorSession(SEMI2K)
    session.put("x", np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"x: leaf 0 has shape \[3, 2\], the program expects \[2, 3\]"):  # fmt: skip
        session.execute(_double(), ["x"], ["y"])
    session.put("x", np.ones((2, 3), np.float32))
    session.execute(_double(), ["x"], ["y"])
    np.testing.assert_allclose(session.reveal("y"), 2 * np.ones((2, 3)), atol=1e-4)


def test_pphlo_type_shapes_parse():
    assert type_shape("tensor<2x3x!pphlo.secret<f32>>") == (2, 3)
    assert type_shape("tensor<f32>") == ()
    assert type_shape("tensor<4xi32>") == (4,)


def test_a_program_that_declassifies_does_not_compile(monkeypatch):
    monkeypatch.setattr(visibility, "find_declassifications", lambda text: ["%7 = pphlo.convert %3"])  # fmt: skip
    job = ProgramDef("leaky", lambda a: a + 1, (np.zeros(2, np.float32),), ("x",), ("data",))  # fmt: skip
    with pytest.raises(ValueError, match="visibility: leaky computes a public value from a secret in 1 place"):  # fmt: skip
        compiler.compile_program(job, SEMI2K)


def test_semi2k_with_a_trusted_first_party_is_refused_before_any_session_starts():
    cluster = loopback_cluster(("alice", "bob"), "SEMI2K")
    with pytest.raises(ValueError, match="SEMI2K with TrustedFirstParty is insecure"):
        with sf_party_session(cluster, "alice"):
            pass
