"""GGUF checkpoints: files written here with the `gguf` library's own writer, as llama.cpp's
converter writes them (q and k rows permuted, projections quantized, a gpt2-style BPE
tokenizer in the metadata), read back through `load_pretrained`.

The reference is the same weights saved by transformers as a Hugging Face directory: the
GGUF file at F32 must give the same logits (which fails if the q/k permutation is not
undone), and each quantized type must stay within its quantization error.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_llama import batch, llama_config, write_checkpoint  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from secfwt_jax.models.checkpoint import (  # noqa: E402
    CheckpointError,
    load_pretrained,
    load_tokenizer,
)
from secfwt_jax.models.gguf_checkpoint import permute  # noqa: E402
from secfwt_jax.models.heads import HeadConfig  # noqa: E402
from secfwt_jax.runtime import cli  # noqa: E402

HEAD = HeadConfig(kind="lm", verbalizer_ids=(3, 4))
SPECIAL = ["<|im_start|>", "<|im_end|>"]
TOKENS = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"] + SPECIAL  # 261 tokens
MERGES = ["Ġ t", "h e", "Ġt he"]


def hf_checkpoint(tmp_path, tied: bool = True):
    config = llama_config(kv_heads=2, tied=tied, vocab_size=len(TOKENS), hidden_size=64,
                          intermediate_size=96, num_attention_heads=4)  # fmt: skip
    folder = tmp_path / "hf"
    return config, write_checkpoint(folder, config), folder


def write_gguf(path, config, params, kind: str = "F32", arch: str = "llama", extra=None):
    """The inverse of our loader, by the rules llama.cpp's converter follows."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])
    writer.add_bos_token_id(len(TOKENS) - 2)
    writer.add_eos_token_id(len(TOKENS) - 1)
    qtype = gguf.GGMLQuantizationType[kind]

    def add(name, value, quantize=True):
        value = np.asarray(value, np.float32)
        if quantize and value.ndim == 2 and kind != "F32":
            data = gguf.quants.quantize(value, qtype)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)

    model = params["model"]
    add("token_embd.weight", model["embed_tokens"]["embedding"])
    add("output_norm.weight", model["norm"]["weight"])
    if "lm_head" in params:
        add("output.weight", params["lm_head"]["kernel"].T)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    for i, layer in model["layers"].items():
        attn, mlp = layer["self_attn"], layer["mlp"]
        add(f"blk.{i}.attn_norm.weight", layer["input_layernorm"]["weight"])
        add(f"blk.{i}.ffn_norm.weight", layer["post_attention_layernorm"]["weight"])
        add(f"blk.{i}.attn_q.weight", permute(attn["q_proj"]["kernel"].T, heads))
        add(f"blk.{i}.attn_k.weight", permute(attn["k_proj"]["kernel"].T, kv))
        add(f"blk.{i}.attn_v.weight", attn["v_proj"]["kernel"].T)
        add(f"blk.{i}.attn_output.weight", attn["o_proj"]["kernel"].T)
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            add(f"blk.{i}.ffn_{ours}.weight", mlp[theirs]["kernel"].T)
    for name, (data, qtype_raw) in (extra or {}).items():
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype_raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(path):
    classifier, params = load_pretrained(path, head=HEAD)
    ids, mask = batch()
    out = classifier.next_token_logits(params, {"input_ids": ids % len(TOKENS), "attention_mask": mask})  # fmt: skip
    return np.asarray(out)[mask.astype(bool)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    config, params, folder = hf_checkpoint(tmp)
    return tmp, config, params, folder, logits(folder)


def test_an_f32_file_gives_the_hugging_face_checkpoints_logits(checkpoints):
    tmp, config, params, _, want = checkpoints
    got = logits(write_gguf(tmp / "f32.gguf", config, params))
    assert np.max(np.abs(got - want)) < 1e-5


def test_without_undoing_the_permutation_the_logits_differ(checkpoints, monkeypatch):
    """The control for the test above: skipping `unpermute` changes the logits."""
    from secfwt_jax.models import gguf_checkpoint

    tmp, config, params, _, want = checkpoints
    path = write_gguf(tmp / "f32_again.gguf", config, params)
    monkeypatch.setattr(gguf_checkpoint, "unpermute", lambda w, heads: w)
    assert np.max(np.abs(logits(path) - want)) > 1e-3


@pytest.mark.parametrize(("kind", "tol"), [("F16", 2e-3), ("BF16", 2e-2), ("Q8_0", 2e-2), ("Q4_0", 0.3), ("Q4_1", 0.3)])  # fmt: skip
def test_quantized_types_load_within_their_quantization_error(checkpoints, kind, tol):
    tmp, config, params, _, _ = checkpoints
    _, loaded = load_pretrained(write_gguf(tmp / f"{kind}.gguf", config, params, kind), head=HEAD)
    want = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    got = loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    scale = np.abs(want).max()
    assert np.max(np.abs(got - want)) < tol * scale  # q came back in Hugging Face's row order


def test_an_untied_file_loads_its_output_matrix(tmp_path):
    config, params, folder = hf_checkpoint(tmp_path, tied=False)
    path = write_gguf(tmp_path / "untied.gguf", config, params)
    classifier, loaded = load_pretrained(path, head=HEAD)
    assert not classifier.config.tie_embeddings
    np.testing.assert_allclose(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert np.max(np.abs(logits(path) - logits(folder))) < 1e-5


def test_a_directory_holding_one_gguf_file_loads_and_its_tokenizer_comes_from_the_metadata(checkpoints):  # fmt: skip
    tmp, config, params, _, want = checkpoints
    folder = tmp / "only_gguf"
    folder.mkdir()
    write_gguf(folder / "model.gguf", config, params)
    assert np.max(np.abs(logits(folder) - want)) < 1e-5
    tokenizer = load_tokenizer(folder)
    assert tokenizer(" the").input_ids == [TOKENS.index("Ġthe")]
    assert tokenizer("<|im_start|>").input_ids == [len(TOKENS) - 2]  # a control token is one token
    assert tokenizer.eos_token == "<|im_end|>"


def test_import_gguf_writes_an_ordinary_hugging_face_directory(checkpoints, capsys):
    tmp, config, params, _, want = checkpoints
    path = write_gguf(tmp / "import.gguf", config, params)
    out = tmp / "imported"
    assert cli.main(["import-gguf", str(path), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert np.max(np.abs(logits(out) - want)) < 1e-5
    assert load_tokenizer(out)(" the").input_ids == [TOKENS.index("Ġthe")]
    assert cli.main(["import-gguf", str(path), "--out", str(out)]) == 2  # never over a directory
    assert "exists and is not empty" in capsys.readouterr().err


def test_bad_files_are_refused_in_one_line_naming_the_file(checkpoints, tmp_path):
    tmp, config, params, _, _ = checkpoints
    good = write_gguf(tmp / "whole.gguf", config, params).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    other = write_gguf(tmp_path / "gpt2.gguf", config, params, arch="gpt2")
    q5 = gguf.GGMLQuantizationType.Q5_0
    raw = np.zeros((4, 22), np.uint8)  # 4 rows of one Q5_0 block (32 values)
    odd = write_gguf(tmp_path / "q5.gguf", config, params, extra={"blk.0.attn_q.bias": (raw, q5)})
    cases = {
        truncated: "corrupt or truncated GGUF file",
        garbage: "corrupt or truncated GGUF file",
        other: "holds architecture 'gpt2'; only llama is supported",
        odd: "has type Q5_0; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
        tmp_path / "missing.gguf": "GGUF file not found",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_pretrained(path, head=HEAD)
        text = str(info.value)
        assert message in text and str(path) in text and "\n" not in text, text
