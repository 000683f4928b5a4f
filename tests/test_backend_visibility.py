"""Both backends compile every program through `compile.compiler.compile_program` (its
visibility checks, the same key, a real cache hit through `compile.artifacts`) and refuse
the same mistakes: a compiled program that makes a secret public, and a plaintext value
given where the program takes shares."""

from __future__ import annotations

import numpy as np
import pytest

from secfwt_jax.compile import compiler
from secfwt_jax.compile.protocols import preset
from secfwt_jax.run.build import ProgramDef
from secfwt_jax.runtime.cluster_backend import ClusterBackend
from secfwt_jax.runtime.sim_backend import Held, SimBackend

PRESET = preset("ABY3")


def scaled(x, lr):
    return x * lr


PROGRAM = ProgramDef(
    "scaled", scaled, (np.zeros((4, 3), np.float32), np.float32(0.0)), ("x", "lr"),
    ("data", "step_size"), {"what": "a secret times a public step size"},
)  # fmt: skip


def backends(cache):
    return {"sim": SimBackend(PRESET, cache_dir=cache), "cluster": ClusterBackend(None, "alice", PRESET, cache_dir=cache)}  # fmt: skip


def test_both_backends_compile_the_checked_artifact_under_one_key(tmp_path):
    sim, cluster = backends(tmp_path / "cache").values()
    first = sim.compile(PROGRAM)
    second = cluster.compile(PROGRAM)
    assert not first.cache_hit and second.cache_hit  # the cluster read what the simulator stored
    assert second.key == first.key == compiler.compile_program(PROGRAM, PRESET).key  # fmt: skip
    assert first.secret_args == second.secret_args == (True, False)


def test_a_program_that_makes_a_secret_public_is_refused_on_both_backends(tmp_path, monkeypatch):
    real = compiler.compile_to_pphlo

    def leaky(*args, **kwargs):
        """What a compiler that declassified the secret input would emit."""
        compiled = real(*args, **kwargs)
        lines = compiled.pphlo_text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.strip().startswith("return"))
        leak = (
            "    %leak = pphlo.convert %arg0 : (tensor<4x3x!pphlo.secret<f32>>) -> tensor<4x3xf32>"
        )
        return compiled._replace(pphlo_text="\n".join(lines[:at] + [leak] + lines[at:]))

    monkeypatch.setattr(compiler, "compile_to_pphlo", leaky)
    for name, backend in backends(tmp_path / "cache").items():
        with pytest.raises(ValueError, match="visibility: scaled computes a public value from a secret in 1 place"):  # fmt: skip
            backend.compile(PROGRAM)
        assert not list((tmp_path / "cache").glob("*")), name  # nothing cached


def test_a_plaintext_value_where_the_program_takes_shares_is_refused_on_both_backends(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    for backend in backends(tmp_path / "cache").values():
        program = backend.compile(PROGRAM)
        with pytest.raises(ValueError, match=r"visibility: scaled argument 0 is secret, but was given in plaintext"):  # fmt: skip
            backend.execute(program, x, np.float32(0.5))
    sim = SimBackend(PRESET)
    program = sim.compile(PROGRAM)
    with pytest.raises(ValueError, match="argument 1 is public, but was given as shares"):
        sim.execute(program, sim.share(Held("bob", x)), sim.share(Held("bob", np.float32(0.5))))
    (out,) = sim.execute(program, sim.share(Held("bob", x)), np.float32(0.5))  # shared as compiled
    np.testing.assert_allclose(sim.reveal_to("bob", out).value, 0.5 * x, atol=1e-3)


def test_both_backends_meet_the_declared_protocol():
    from secfwt_jax.runtime.backend import Backend

    for name, backend in backends(None).items():
        assert isinstance(backend, Backend), name
    assert not isinstance(object(), Backend)
