"""Compile artifacts on disk, the compile cache, job building and `secfwt compile`."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from secfwt_jax.compile import artifacts, protocols, simulator
from secfwt_jax.compile.job_config import config_from_dict, load_config
from secfwt_jax.compile.jobs import build_job
from secfwt_jax.compile.session import SimulatorSession
from secfwt_jax.runtime.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "family": "bert", "vocab_size": 16, "hidden_size": 8, "num_layers": 1, "num_heads": 2,
    "intermediate_size": 16, "max_positions": 16,
}  # fmt: skip


def tiny_config(**overrides) -> dict:
    body = {
        "function": "spsa_step",
        "batch_size": 2,
        "seq_len": 4,
        "model": dict(TINY_MODEL),
        "attention": {"kind": "rfa", "trig": "poly", "num_features": 4},
        "trainable": {"kind": "head"},
        "spsa": {"eps": 1e-2, "num_directions": 2},
        "protocol": {"name": "ABY3"},
    }
    body.update(overrides)
    return {"compile": body}


@pytest.fixture
def spu_compile_calls(monkeypatch):
    """Counts calls into the SPU compiler (spu.utils.frontend.compile)."""
    calls = []
    real = simulator.spu_fe.compile

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(simulator.spu_fe, "compile", counting)
    return calls


def _affine_job(shape=(3, 2), description=None) -> artifacts.CompileJob:
    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 7  # closed over -> hoisted constant

    def affine(x, lr):
        return {"y": x @ w[: x.shape[1]] * lr, "s": jnp.sum(x)}

    x = np.zeros(shape, np.float32)
    return artifacts.CompileJob(
        "affine", affine, (x, np.float32(0)), ("x", "lr"), ("data", "step_size"),
        description or {"what": "affine"}, {"w": ("projection", w)},
    )  # fmt: skip


def test_cache_key_changes_with_shape_config_protocol_and_version(monkeypatch):
    aby3 = protocols.preset("ABY3")
    key = artifacts.cache_key(artifacts.key_payload(_affine_job(), aby3))
    assert key == artifacts.cache_key(artifacts.key_payload(_affine_job(), aby3))  # stable
    assert len(key) == 64
    others = [
        artifacts.key_payload(_affine_job(shape=(4, 2)), aby3),
        artifacts.key_payload(_affine_job(description={"what": "other"}), aby3),
        artifacts.key_payload(_affine_job(), protocols.preset("ABY3", fxp_fraction_bits=20)),
        artifacts.key_payload(_affine_job(), protocols.preset("SEMI2K")),
    ]
    bumped = {**artifacts.versions(), "spu": "9.9"}
    monkeypatch.setattr(artifacts, "versions", lambda: bumped)
    others.append(artifacts.key_payload(_affine_job(), aby3))
    keys = {artifacts.cache_key(p) for p in others}
    assert key not in keys and len(keys) == len(others)


def test_second_compile_is_a_disk_cache_hit_that_skips_the_spu_compiler(
    tmp_path, spu_compile_calls
):
    cfg = config_from_dict(tiny_config())
    first, hit = artifacts.compile_cached(build_job(cfg), cfg.protocol, tmp_path)
    assert not hit and len(spu_compile_calls) == 1
    # A fresh job object (new closures, so the in-memory cache cannot answer either).
    second, hit = artifacts.compile_cached(build_job(cfg), cfg.protocol, tmp_path)
    assert hit and len(spu_compile_calls) == 1
    assert second.key == first.key and second.pphlo_text == first.pphlo_text
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # no temp dirs left behind


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
    cfg = config_from_dict(tiny_config(trainable={"kind": "bitfit"}))
    job = build_job(cfg)
    art, _ = artifacts.compile_cached(job, cfg.protocol, tmp_path)
    loaded = artifacts.load_artifact(tmp_path / art.key)
    rng = np.random.default_rng(0)
    theta, frozen, batch, z, _ = job.args
    batch = {
        "input_ids": np.eye(16, dtype=np.float32)[rng.integers(0, 16, (2, 4))],
        "attention_mask": np.ones((2, 4), np.float32),
        "labels": np.eye(2, dtype=np.float32)[[0, 1]],
    }
    z = jax.tree_util.tree_map(lambda v: rng.standard_normal(np.shape(v)).astype(np.float32), z)
    args = (theta, frozen, batch, z, np.float32(0.05))

    fresh = simulator.compile_to_pphlo(job.fn, args, {3, 4}, name=job.name, rewrites=cfg.protocol.rewrites)  # fmt: skip
    session = SimulatorSession(cfg.protocol)
    for name, value, public in zip(job.arg_names, args, [0, 0, 0, 1, 1], strict=True):
        session.put(name, value, public=bool(public))
    session.run(fresh, list(job.arg_names), ["theta_fresh", "info_fresh"])
    session.run(loaded, list(job.arg_names), ["theta_loaded", "info_loaded"])
    info_fresh, info_loaded = session.reveal("info_fresh"), session.reveal("info_loaded")
    np.testing.assert_allclose(info_loaded["loss_plus"], info_fresh["loss_plus"], atol=1e-4)
    theta_loaded, info_run = artifacts.run_artifact(loaded, args)  # one-shot runner
    np.testing.assert_allclose(info_run["loss"], info_fresh["loss"], atol=1e-4)
    plain_theta, plain_info = job.fn(*args)
    np.testing.assert_allclose(info_run["loss"], plain_info["loss"], atol=5e-3)
    assert loaded.metadata["declassifications"] == 0


def _roles(meta):
    return {i["arg"]: (i["role"], i["visibility"]) for i in meta["inputs"]}


def test_each_function_compiles_with_policy_roles(tmp_path):
    prompt = {"kind": "prompt", "prompt_length": 2, "intrinsic_dim": 4}
    cases = {
        "cma_forward": tiny_config(function="cma_forward", trainable=prompt, cma={"population": 3}),
        "backprop_step": tiny_config(function="backprop_step"),
        "forward": tiny_config(function="forward", trainable=prompt),
    }
    metas = {}
    for name, raw in cases.items():
        cfg = config_from_dict(raw)
        metas[name] = artifacts.compile_job(build_job(cfg), cfg.protocol).metadata
        assert metas[name]["name"] == name and metas[name]["declassifications"] == 0
    cma = metas["cma_forward"]
    assert _roles(cma)["population"] == ("directions", "public")
    assert _roles(cma)["frozen"] == ("weights", "secret")
    assert [i["shape"] for i in cma["inputs"] if i["arg"] == "population"] == [[3, 4]]
    assert cma["outputs"][0]["shape"] == [3]  # one loss per candidate
    assert "projection" in {i["role"] for i in cma["inputs"]}  # A found among the constants
    bp = metas["backprop_step"]
    assert _roles(bp)["step_size"] == ("step_size", "public")
    assert {o["name"] for o in bp["outputs"]} == {"0/classifier/bias", "0/classifier/kernel", "1/loss"}  # fmt: skip
    fwd = metas["forward"]
    assert "labels" not in {i["role"] for i in fwd["inputs"]}
    assert fwd["outputs"][0]["shape"] == [2, 2]  # logits [B, C]


def test_cli_compile_writes_artifact_from_the_shipped_config(tmp_path, capsys):
    config = REPO / "configs" / "compile_tiny.yaml"
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["compile", str(config), "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [artifacts.EXECUTABLE, artifacts.PPHLO, artifacts.CONSTANTS, artifacts.METADATA]
    )
    meta = json.loads((out / "metadata.json").read_text())
    cfg = load_config(config)
    assert meta["name"] == "spsa_step" and meta["protocol"]["name"] == "ABY3"
    assert meta["field"] == "FM64" and meta["fxp_fraction_bits"] == 18
    assert meta["protocol"]["exp_mode"] == "PADE" and "compiler_options" in meta
    assert set(meta["versions"]) >= {"jax", "jaxlib", "spu", "flax", "secfwt_jax"}
    roles = _roles(meta)
    assert roles["trainable"] == ("trainable", "secret") and roles["z"] == ("directions", "public")
    assert {i["role"] for i in meta["inputs"] if i["arg"] == "batch"} == {"data", "labels"}
    ids = next(i for i in meta["inputs"] if i["name"] == "batch/input_ids")
    assert ids["shape"] == [cfg.batch_size, cfg.seq_len, cfg.model.vocab_size]
    assert ids["dtype"] == "float32" and ids["visibility"] == "secret"
    assert "features" in {i["role"] for i in meta["inputs"]}  # RFA directions are public
    assert "!pphlo.secret" in (out / "program.pphlo").read_text()
    assert artifacts.load_artifact(out).key == meta["key"]
    assert "compiled in" in capsys.readouterr().out
    assert main(["compile", str(config), "--out", str(out), "--cache-dir", str(cache)]) == 0
    assert "cache hit" in capsys.readouterr().out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["compile"]["model"].update(hidden_size=0), "compile.model.hidden_size: must be positive"),
        (lambda c: c["compile"]["model"].update(colour="red"), "compile.model.colour: unknown key"),
        (lambda c: c["compile"].update(batch_size="four"), "compile.batch_size: expected an integer"),
        (lambda c: c["compile"]["spsa"].update(eps=-1.0), "compile.spsa.eps: must be positive"),
        (lambda c: c["compile"]["attention"].update(kind="linear"), "compile.attention.kind: unknown"),
        (lambda c: c["compile"]["protocol"].update(fxp_fraction_bits=40), "compile.protocol.fxp_fraction_bits:"),
        (lambda c: c["compile"].update(function="train"), "compile.function: unknown 'train'"),
        (lambda c: c["compile"]["model"].update(checkpoint="x"), "compile.model.checkpoint: cannot be combined"),
        (lambda c: c["compile"]["model"].pop("num_heads"), "compile.model.num_heads: required"),
        (lambda c: c["compile"].update(function="cma_forward"), "compile.trainable.kind: cma_forward"),
        (lambda c: c["compile"].update(seq_len=99), "compile.seq_len: 99 exceeds"),
    ],
)  # fmt: skip
def test_cli_bad_config_exits_2_with_one_line_error_and_writes_nothing(
    tmp_path, capsys, edit, message
):
    raw = tiny_config()
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


def test_cli_missing_config_and_foreign_out_dir_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert "config: file not found" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = tmp_path / "ok.json"
    config.write_text(json.dumps(tiny_config()))
    assert main(["compile", str(config), "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
