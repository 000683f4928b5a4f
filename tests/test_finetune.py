"""`secfwt finetune` on the embedded simulator: the whole job through the one builder."""

import json
from pathlib import Path

import numpy as np
import pytest

from secfwt_jax.compile import protocols
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.sim_backend import Held, PlacementError, SimBackend
from secfwt_jax.runtime.sim_run import finetune_in_simulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CSV = ROOT / "tests" / "data" / "sentiment_small.csv"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    spec = load_spec(TINY)
    report = finetune_in_simulator(spec, seeds=PrivateSeeds(11), cache_dir=out / "cache", out_dir=out, progress=False)  # fmt: skip
    return spec, report, out


def test_mpc_run_equals_its_plaintext_reference(tiny_run):
    _, report, _ = tiny_run
    ref = report["plaintext_reference"]
    assert ref["relative_param_gap"] < 1e-3
    assert ref["max_loss_gap"] < 1e-2
    assert ref["agreement_before"] == 1.0 and ref["agreement_after"] == 1.0
    assert len(report["mpc"]["losses"]) == 3


def test_the_report_holds_spec_hash_costs_keys_and_curves(tiny_run):
    spec, report, out = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["spec_hash"] == spec.spec_hash
    assert set(on_disk["programs"]) == {"trunk", "trunk_eval", "predict", "spsa_step"}
    assert all(len(p["key"]) == 64 for p in on_disk["programs"].values())
    assert on_disk["cost"]["total_bytes"] > 0 and on_disk["cost"]["per_program"]["spsa_step"]["runs"] == 3  # fmt: skip
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_compile_profile_predicts_the_runs_bytes_exactly(tiny_run):
    """`secfwt compile --profile` runs each cached artifact once on zeros: bytes depend on
    shapes only, so calls x bytes per call is what the run measured, to the byte."""
    from secfwt_jax.compile.spec_programs import profile_run

    spec, report, out = tiny_run
    prof = profile_run(spec, out / "cache", log=lambda m: None)
    measured = report["cost"]["per_program"]
    assert {r["program"]: r["key"] for r in prof["programs"]} == {k: p["key"] for k, p in report["programs"].items()}  # fmt: skip
    for row in prof["programs"]:
        assert row["calls"] == measured[row["program"]]["runs"]
        assert row["bytes_per_call"] * row["calls"] == measured[row["program"]]["total_bytes"]
    assert prof["run_total_bytes"] == report["cost"]["total_bytes"]


def test_tuned_parameters_are_written_only_at_the_receiver(tiny_run):
    _, report, out = tiny_run
    assert report["tuned_params"]["party"] == "alice"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz") if "cache" not in p.parts)  # fmt: skip
    assert written == ["alice/tuned_params.npz"]


def test_a_second_run_hits_the_compile_cache(tiny_run, tmp_path):
    spec, first, out = tiny_run
    again = finetune_in_simulator(spec.replace(tuning={**spec.tuning.model_dump(), "steps": 1}), seeds=PrivateSeeds(11),
                    cache_dir=out / "cache", out_dir=tmp_path, progress=False)  # fmt: skip
    assert all(p["cache_hit"] for p in again["programs"].values())
    assert {k: p["key"] for k, p in again["programs"].items()} == {k: p["key"] for k, p in first["programs"].items()}  # fmt: skip


def test_a_party_cannot_read_another_partys_private_value():
    backend = SimBackend(protocols.preset("SEMI2K"), profile=False)
    mine = backend.at("bob", lambda: np.ones(3))
    assert isinstance(mine, Held) and mine.party == "bob"
    with pytest.raises(PlacementError, match="alice cannot read a private value of bob"):
        backend.at("alice", lambda x: x, mine)
    secret = backend.share(mine)
    with pytest.raises(PlacementError, match="secret-shared value"):
        backend.at("bob", lambda x: x, secret)
    np.testing.assert_allclose(backend.reveal_to("bob", secret).value, np.ones(3), atol=1e-4)


# --------------------------------------------------------------- other checkpoint families
def _bpe_tokenizer(directory: Path, kind: str):
    """A small byte-level BPE tokenizer trained on the test CSV (offline), saved as HF files."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    texts = CSV.read_text().splitlines() + [" It was great . It was terrible ."] * 200
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(texts, vocab_size=420, min_frequency=2, special_tokens=specials)
    files = directory / "bpe"
    files.mkdir(parents=True)
    vocab, merges = bpe.save_model(str(files))
    if kind == "roberta":
        tok = RobertaTokenizerFast(vocab_file=vocab, merges_file=merges)
    else:
        tok = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges, unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>", pad_token="<pad>")  # fmt: skip
    tok.save_pretrained(directory)
    return tok


def _checkpoint(directory: Path, kind: str) -> Path:
    from transformers import (
        FlaxGPT2LMHeadModel,
        FlaxRobertaForMaskedLM,
        GPT2Config,
        RobertaConfig,  # fmt: skip
    )

    tok = _bpe_tokenizer(directory, kind)
    if kind == "roberta":
        cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=40, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        FlaxRobertaForMaskedLM(cfg, seed=3).save_pretrained(directory)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=40,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        model = FlaxGPT2LMHeadModel(cfg, seed=3)
        model.save_pretrained(directory, params=_pretrained_biases(model.params))
    return directory


def _pretrained_biases(params: dict) -> dict:
    """A fresh GPT-2's biases are all zero; a pretrained one's are not. BitFit tunes the
    biases, so from zeros the relative parameter gap would be the relative gap of the
    update alone, which the test reads separately (`relative_update_gap`)."""
    from flax import traverse_util

    rng = np.random.default_rng(7)
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        if path[-1] == "bias":
            flat[path] = rng.normal(0.0, 0.02, leaf.shape).astype(leaf.dtype)
    return traverse_util.unflatten_dict(flat)


# GPT-2 with BitFit takes about 1.8 min on 2 cores, so it runs with -m slow; RoBERTa stays.
@pytest.mark.parametrize("kind, head, trainable", [
    ("roberta", "mlm", "lora"), pytest.param("gpt2", "lm", "bitfit", marks=pytest.mark.slow)])  # fmt: skip
def test_roberta_and_gpt2_checkpoints_tune_through_finetune(kind, head, trainable, tmp_path):
    ckpt = _checkpoint(tmp_path / kind, kind)
    spec = load_spec(TINY, [
        "model.architecture=null", f"model.checkpoint={ckpt}", "model.tokenizer=null",
        f"model.head.kind={head}", "data.template='{text} It was {mask} .'",
        "data.verbalizer={negative: ' terrible', positive: ' great'}",
        f"tuning.trainable={{kind: {trainable}, lora_rank: 2}}", "tuning.steps=2",
        "data.max_len=16", "evaluation.mpc_examples=4", "evaluation.batch_size=8",
    ])  # fmt: skip
    report = finetune_in_simulator(
        spec, seeds=PrivateSeeds(5), out_dir=tmp_path / "out", progress=False
    )
    assert set(report["programs"]) == {"predict", "spsa_step"}
    ref = report["plaintext_reference"]
    assert ref["relative_param_gap"] < 1e-3
    # MPC's loss differences carry fixed-point noise that SPSA divides by 2 eps: measured
    # 2e-4 to 1e-3 of the update; a wrong sign or scale would be order 1.
    assert ref["relative_update_gap"] < 1e-2
    assert ref["agreement_after"] == 1.0
    assert report["tuned_params"]["party"] == "alice"


def tiny_bert_checkpoint(base: Path) -> Path:
    """A 2-layer BERT written by `save_pretrained`, with the tiny preset's tokenizer (MiniLM's
    vocabulary cut to its first 4,096 entries)."""
    import shutil

    from transformers import BertConfig, FlaxBertModel

    tokenizer = ROOT / "configs" / "tokenizers" / "minilm-4k"
    cfg = BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    FlaxBertModel(cfg, seed=1).save_pretrained(base)
    for path in tokenizer.iterdir():
        shutil.copy2(path, base / path.name)
    return base


def test_adapt_writes_a_checkpoint_that_the_spec_uses_and_checks(tmp_path):
    from secfwt_jax.run.build import load_model
    from secfwt_jax.run.spec import SpecError
    from secfwt_jax.runtime.adapt import adapt_checkpoint

    base = tiny_bert_checkpoint(tmp_path / "base")
    spec = load_spec(TINY, ["model.architecture=null", f"model.checkpoint={base}",
                            f"model.adapted_checkpoint={tmp_path / 'adapted'}"])  # fmt: skip
    texts = [line.split(",")[0] for line in CSV.read_text().splitlines()[1:60]]
    info = adapt_checkpoint(base, texts, tmp_path / "adapted", spec.model.attention, steps=3,
                            learning_rate=1e-3, batch_size=8, max_len=12, log=lambda m: None)  # fmt: skip
    assert info["steps"] == 3 and (tmp_path / "adapted" / "secfwt_adaptation.json").is_file()
    floors = info["heldout_rfa_normaliser_floor"]  # one per layer, on the held-out rows
    assert len(floors) == 2 and all(f > 0 for f in floors)
    assert (info["normaliser_margin"], info["normaliser_weight"]) == (0.1, 1.0)  # the defaults
    with pytest.raises(ValueError, match="^--normaliser-margin: must be positive, got 0.0$"):
        adapt_checkpoint(base, texts, tmp_path / "never", spec.model.attention, steps=1,
                         batch_size=8, normaliser_margin=0.0, log=lambda m: None)  # fmt: skip
    assert not (tmp_path / "never").exists()
    logs = []
    head = __import__("secfwt_jax.models.heads", fromlist=["HeadConfig"]).HeadConfig(num_labels=2)
    _, adapted = load_model(spec, head, 0, log=logs.append)
    _, original = load_model(spec.replace(model={**spec.model.model_dump(), "adapted_checkpoint": None}), head, 0)  # fmt: skip
    assert "attention-adapted checkpoint" in logs[0]
    q = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")
    pick = lambda p: __import__("functools").reduce(lambda d, k: d[k], q, p)  # noqa: E731
    assert not np.allclose(pick(adapted), pick(original))
    other = spec.replace(model={**spec.model.model_dump(), "attention": {**spec.model.attention.__dict__, "num_features": 8}})  # fmt: skip
    with pytest.raises(SpecError, match="adapted for other attention settings \\(num_features\\)"):
        load_model(other, head, 0, log=lambda m: None)


@pytest.mark.parametrize("where", ["input", "deep"])
def test_cma_es_prompt_tuning_runs_through_the_same_command(tmp_path, where):
    """At the input (every candidate runs the whole model), or as a deep prompt at the top
    layer's input over the cached trunk (the trunk program runs once per chunk)."""
    deep = ", cache_trunk: true, top_layers: 1" if where == "deep" else ""
    spec = load_spec(TINY, [
        "tuning.method=cma", f"tuning.trainable={{kind: prompt, prompt_length: 2, intrinsic_dim: 6{deep}}}",
        "tuning.cma={population: 3, sigma0: 1.0}", "tuning.steps=2", "parties.result_to=data_owner",
        "evaluation.mpc_examples=4", "evaluation.batch_size=4",
    ])  # fmt: skip
    report = finetune_in_simulator(spec, seeds=PrivateSeeds(2), out_dir=tmp_path, progress=False, log=lambda m: None)  # fmt: skip
    trunk = {"trunk", "trunk_eval"} if where == "deep" else set()
    assert set(report["programs"]) == {"predict", "population_loss"} | trunk
    assert len(report["mpc"]["losses"]) == 2  # the best candidate's loss per generation, to bob
    assert report["tuned_params"]["party"] == "bob"
    with np.load(report["tuned_params"]["path"]) as f:
        assert f["z"].shape == (6,) and np.abs(f["z"]).max() > 0
    ref = report["plaintext_reference"]
    assert ref["agreement_before"] == 1.0
    np.testing.assert_allclose(report["mpc"]["losses"][0], ref["losses"][0], atol=1e-2)


def test_adapting_to_a_gelu_stand_in_moves_the_ffn_and_the_spec_must_match(tmp_path):
    from secfwt_jax.models.heads import HeadConfig
    from secfwt_jax.run.build import load_model
    from secfwt_jax.run.spec import SpecError
    from secfwt_jax.runtime.adapt import adapt_checkpoint

    base = tiny_bert_checkpoint(tmp_path / "base")
    adapted_dir = tmp_path / "adapted-relu"
    spec = load_spec(TINY, ["model.architecture=null", f"model.checkpoint={base}",
                            f"model.adapted_checkpoint={adapted_dir}", "model.gelu=relu"])  # fmt: skip
    texts = [line.split(",")[0] for line in CSV.read_text().splitlines()[1:60]]
    info = adapt_checkpoint(base, texts, adapted_dir, spec.model.attention, steps=3,
                            learning_rate=1e-3, batch_size=8, max_len=12, gelu_impl="relu",
                            log=lambda m: None)  # fmt: skip
    assert (info["gelu"], info["param_set"]) == ("relu", "encoder")
    head = HeadConfig(num_labels=2)
    clf, adapted = load_model(spec, head, 0, log=lambda m: None)
    assert clf.config.gelu_impl == "relu"
    logs: list[str] = []
    _, original = load_model(spec.replace(model={**spec.model.model_dump(), "adapted_checkpoint": None}), head, 0, log=logs.append)  # fmt: skip
    assert any("model.gelu relu on a checkpoint not adapted to it" in m for m in logs)
    ffn = ("bert", "encoder", "layer", "1", "intermediate", "dense", "kernel")
    pick = lambda p: __import__("functools").reduce(lambda d, k: d[k], ffn, p)  # noqa: E731
    assert not np.allclose(pick(adapted), pick(original))  # the FFN moved too
    accurate = spec.replace(model={**spec.model.model_dump(), "gelu": "piecewise"})
    with pytest.raises(SpecError, match="^model.gelu: .* was adapted for gelu 'relu', the spec says 'piecewise'$"):  # fmt: skip
        load_model(accurate, head, 0, log=lambda m: None)
