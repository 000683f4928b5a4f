"""Compile artifacts on disk, the compile cache, the run's programs and `secfwt compile`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from secfwt_jax.compile import artifacts, compiler, protocols
from secfwt_jax.compile.protocols import preset_of
from secfwt_jax.compile.simulator import SimulatorSession
from secfwt_jax.compile.spec_programs import compile_run, programs_of_run
from secfwt_jax.run.program import ProgramDef
from secfwt_jax.run.spec import load_spec, read_spec_file
from secfwt_jax.runtime.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny_spec(*overrides: str):
    return load_spec(TINY, list(overrides))


@pytest.fixture
def spu_compile_calls(monkeypatch):
    """Counts calls into the SPU compiler (spu.utils.frontend.compile)."""
    calls = []
    real = compiler.spu_fe.compile

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(compiler.spu_fe, "compile", counting)
    return calls


def _affine_job(shape=(3, 2), description=None) -> ProgramDef:
    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 7  # closed over -> hoisted constant

    def affine(x, lr):
        return {"y": x @ w[: x.shape[1]] * lr, "s": jnp.sum(x)}

    x = np.zeros(shape, np.float32)
    return ProgramDef(
        "affine", affine, (x, np.float32(0)), ("x", "lr"), ("data", "step_size"),
        description or {"what": "affine"}, {"w": ("projection", w)},
    )  # fmt: skip


def test_cache_key_changes_with_shape_config_protocol_and_version(monkeypatch):
    aby3 = protocols.preset("ABY3")
    key = compiler.cache_key(compiler.key_payload(_affine_job(), aby3))
    assert key == compiler.cache_key(compiler.key_payload(_affine_job(), aby3))  # stable
    assert len(key) == 64
    others = [
        compiler.key_payload(_affine_job(shape=(4, 2)), aby3),
        compiler.key_payload(_affine_job(description={"what": "other"}), aby3),
        compiler.key_payload(_affine_job(), protocols.preset("ABY3", fxp_fraction_bits=20)),
        compiler.key_payload(_affine_job(), protocols.preset("SEMI2K")),
    ]
    bumped = {**compiler.versions(), "spu": "9.9"}
    monkeypatch.setattr(compiler, "versions", lambda: bumped)
    others.append(compiler.key_payload(_affine_job(), aby3))
    keys = {compiler.cache_key(p) for p in others}
    assert key not in keys and len(keys) == len(others)


def test_second_compile_is_a_disk_cache_hit_that_skips_the_spu_compiler(
    tmp_path, spu_compile_calls
):
    spec = tiny_spec("tuning.trainable={kind: bitfit}")
    first = compile_run(spec, tmp_path)
    assert [hit for _, hit in first] == [False, False] and len(spu_compile_calls) == 2
    # Fresh programs (new closures, so the in-memory cache cannot answer either).
    second = compile_run(spec, tmp_path)
    assert [hit for _, hit in second] == [True, True] and len(spu_compile_calls) == 2
    assert [a.key for a, _ in second] == [a.key for a, _ in first]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(a.key for a, _ in first)


@pytest.mark.parametrize("damage", ["truncate_executable", "drop_metadata", "edit_constants"])
def test_corrupt_cache_entry_is_detected_and_recompiled(tmp_path, spu_compile_calls, damage):
    preset = protocols.preset("SEMI2K")
    art, _ = artifacts.compile_cached(_affine_job(), preset, tmp_path)
    entry = tmp_path / art.key
    if damage == "truncate_executable":
        data = (entry / artifacts.EXECUTABLE).read_bytes()
        (entry / artifacts.EXECUTABLE).write_bytes(data[: len(data) // 2])
    elif damage == "drop_metadata":
        (entry / artifacts.METADATA).unlink()
    else:
        np.savez(entry / artifacts.CONSTANTS, constant_0=np.ones((3, 2), np.float32))
    with pytest.raises(artifacts.ArtifactError):
        artifacts.load_artifact(entry)
    again, hit = artifacts.compile_cached(_affine_job(), preset, tmp_path)
    assert not hit and len(spu_compile_calls) == 2
    assert artifacts.load_artifact(entry).key == again.key == art.key


def test_loaded_artifact_runs_and_matches_a_fresh_compile(tmp_path):
    spec = tiny_spec("tuning.trainable={kind: bitfit}", "tuning.spsa.num_directions=2")
    program = programs_of_run(spec).step
    preset = preset_of(spec)
    art, _ = artifacts.compile_cached(program, preset, tmp_path)
    loaded = artifacts.load_artifact(tmp_path / art.key)
    rng = np.random.default_rng(0)
    theta, frozen, features, labels, z, _ = program.args
    frozen = jax.tree_util.tree_map(lambda v: (0.1 * rng.standard_normal(v.shape)).astype(np.float32), frozen)  # fmt: skip
    b, n, v = features["input_ids"].shape
    features = {**features, "input_ids": np.eye(v, dtype=np.float32)[rng.integers(0, 50, (b, n))],
                "attention_mask": np.ones((b, n), np.float32)}  # fmt: skip
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, b)]
    z = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), z)
    args = (theta, frozen, features, labels, z, np.float32(0.05))

    fresh = compiler.compile_to_pphlo(program.fn, args, {4, 5}, name=program.name, rewrites=preset.rewrites)  # fmt: skip
    session = SimulatorSession(preset)
    for name, value, public in zip(program.arg_names, args, [0, 0, 0, 0, 1, 1], strict=True):
        session.put(name, value, public=bool(public))
    session.execute(fresh, list(program.arg_names), ["theta_fresh", "loss_fresh"])
    session.execute(loaded, list(program.arg_names), ["theta_loaded", "loss_loaded"])
    np.testing.assert_allclose(session.reveal("loss_loaded"), session.reveal("loss_fresh"), atol=1e-4)  # fmt: skip
    _, loss_run = artifacts.execute_artifact(loaded, args)  # one-shot runner
    _, plain_loss = program.fn(*args)
    np.testing.assert_allclose(loss_run, plain_loss, atol=5e-3)
    assert loaded.metadata["declassifications"] == 0


def _roles(meta):
    return {i["arg"]: (i["role"], i["visibility"]) for i in meta["inputs"]}


def test_every_run_program_compiles_with_policy_roles(tmp_path):
    spsa = {a.metadata["name"]: a.metadata for a, _ in compile_run(tiny_spec(), None)}
    assert set(spsa) == {"trunk", "trunk_eval", "predict", "spsa_step"}
    assert all(m["declassifications"] == 0 for m in spsa.values())
    step = spsa["spsa_step"]
    assert _roles(step)["trainable"] == ("trainable", "secret")
    assert _roles(step)["labels"] == ("labels", "secret")
    assert _roles(step)["z"] == ("directions", "public")
    assert _roles(step)["step_size"] == ("step_size", "public")
    assert spsa["predict"]["outputs"][0]["shape"] == [4, 2]  # one-hot predictions [B, C]
    assert _roles(spsa["trunk"])["inputs"] == ("data", "secret")
    assert _roles(spsa["trunk"])["frozen"] == ("weights", "secret")
    cma = tiny_spec("tuning.method=cma", "tuning.trainable={kind: prompt, prompt_length: 2, intrinsic_dim: 4}",
                    "tuning.cma={population: 3}")  # fmt: skip
    metas = {a.metadata["name"]: a.metadata for a, _ in compile_run(cma, None)}
    pop = metas["population_loss"]
    assert _roles(pop)["population"] == ("directions", "public")
    assert [i["shape"] for i in pop["inputs"] if i["arg"] == "population"] == [[3, 4]]
    assert pop["outputs"][0]["shape"] == [3]  # one loss per candidate
    assert pop["declassifications"] == 0


def test_cli_compile_writes_artifacts_from_the_shipped_spec(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["compile", str(TINY), "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["predict", "spsa_step", "trunk", "trunk_eval"]
    for program in out.iterdir():
        assert sorted(p.name for p in program.iterdir()) == sorted(
            [artifacts.EXECUTABLE, artifacts.PPHLO, artifacts.CONSTANTS, artifacts.METADATA]
        )
    meta = json.loads((out / "spsa_step" / "metadata.json").read_text())
    assert meta["protocol"]["name"] == "ABY3" and meta["field"] == "FM64"
    assert meta["fxp_fraction_bits"] == 18 and meta["protocol"]["exp_mode"] == "PADE"
    assert set(meta["versions"]) >= {"jax", "jaxlib", "spu", "flax", "secfwt_jax"}
    constants = [i for i in meta["inputs"] if i["arg"] == "constant"]
    assert constants and all(i["visibility"] == "public" for i in constants)  # RFA features
    assert "!pphlo.secret" in (out / "spsa_step" / "program.pphlo").read_text()
    assert artifacts.load_artifact(out / "spsa_step").key == meta["key"]
    assert "compiled in" in capsys.readouterr().out
    assert main(["compile", str(TINY), "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.count("cache hit") == 4


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model"]["architecture"].update(hidden_size=0), "model.architecture.hidden_size: Input should be greater than 0"),
        (lambda c: c["model"]["architecture"].update(colour="red"), "model.architecture.colour: unknown key"),
        (lambda c: c["tuning"].update(batch_size="four"), "tuning.batch_size: Input should be a valid integer"),
        (lambda c: c["tuning"]["spsa"].update(eps=-1.0), "tuning.spsa.eps: must be positive"),
        (lambda c: c["model"]["attention"].update(kind="linear"), "model.attention.kind"),
        (lambda c: c["protocol"].update(field="FM32"), "protocol.field"),
        (lambda c: c["tuning"].update(method="train"), "tuning.method"),
        (lambda c: c["model"].update(checkpoint="x"), "model.checkpoint: give exactly one"),
        (lambda c: c["tuning"].update(method="cma"), "tuning.trainable.kind: method 'cma'"),
        (lambda c: c["data"].update(max_len=99), "data.max_len: 99 (+ prompt 0) exceeds"),
    ],
)  # fmt: skip
def test_cli_bad_spec_exits_2_with_one_line_error_and_writes_nothing(
    tmp_path, capsys, edit, message
):
    raw = read_spec_file(TINY)
    raw["data"]["path"] = str(REPO / "tests" / "data" / "sentiment_small.csv")
    raw["model"]["tokenizer"] = str(REPO / "configs" / "tokenizers" / "minilm-4k")
    edit(raw)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    code = main(["compile", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("secfwt: error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_cli_missing_spec_and_foreign_out_dir_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "run spec not found" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["compile", str(TINY), "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
