"""Our Flax trunks and heads against transformers' own Flax models, on real checkpoint files.

Every checkpoint here is written to disk by transformers (or, for the PyTorch-layout
safetensors case, by the inverse of transformers' documented PT->Flax renaming) and read
back through `load_pretrained`, so the loader, the parameter layout and the forward pass
are all under test. No mocks, no hub: tiny random configs plus the bundled real
all-MiniLM-L6-v2.

Every comparison loads with `gelu_impl="exact"` (jax.nn.gelu, the same function as
transformers); the default "piecewise" GeLU is the MPC-cheap approximation (max error
7.5e-4) and is held by tests/test_gelu.py instead.

What is compared: hidden states at REAL tokens of a right-padded batch. Pad positions are
never read downstream; for RoBERTa they differ by design (our public position ids are
arange + pad + 1 everywhere, HF gives pads the padding index).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    FlaxBertForMaskedLM,
    FlaxBertModel,
    FlaxGPT2LMHeadModel,
    FlaxGPT2Model,
    FlaxRobertaForMaskedLM,
    FlaxRobertaModel,
    GPT2Config,
    RobertaConfig,
)

from secfwt_jax.models.checkpoint import (  # noqa: E402
    CheckpointError,
    bundled_minilm_dir,
    load_pretrained,
    load_tokenizer,
)
from secfwt_jax.models.config import AttentionConfig  # noqa: E402
from secfwt_jax.models.gpt2 import Decoder  # noqa: E402
from secfwt_jax.models.heads import HeadConfig  # noqa: E402

TOL = 1e-5
VOCAB = 99
FAMILIES = ("bert", "roberta", "gpt2")
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
HF_CONFIGS = {
    "bert": lambda: BertConfig(
        **TINY, intermediate_size=37, max_position_embeddings=64, type_vocab_size=2
    ),
    "roberta": lambda: RobertaConfig(
        **TINY, intermediate_size=37, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1
    ),
    # GPT-2 pads with eos; keep it inside the tiny vocabulary.
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=VOCAB - 1
    ),
}
BASE_MODELS = {"bert": FlaxBertModel, "roberta": FlaxRobertaModel, "gpt2": FlaxGPT2Model}
LENGTHS = (8, 5, 3)  # right padding to 8


def padded_batch(pad_id: int, seed: int = 0):
    """Right-padded ids [3, 8] (real ids avoid the specials 0..4) and the float mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = (np.arange(max(LENGTHS))[None] < np.asarray(LENGTHS)[:, None]).astype(np.float32)
    return np.where(mask > 0, ids, pad_id).astype(np.int32), mask


def max_err_at_real_tokens(ours, ref, mask) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max(axis=-1)
    return float((diff * mask).max())


def save_pytorch_safetensors(hf_model, directory) -> None:
    """Write `model.safetensors` in PyTorch layout (format "pt") without torch.

    Inverse of transformers' `rename_key_and_reshape_tensor`: 2-D `kernel` -> `weight`
    transposed (nn.Linear [out, in]; GPT-2's Conv1D [in, out]), LayerNorm `scale` ->
    `weight`, `embedding` -> `weight`, names joined with dots.
    """
    tensors = {}
    for key, value in flatten_dict(hf_model.params).items():
        value = np.asarray(value)
        if key[-1] == "kernel":
            key, value = key[:-1] + ("weight",), value.T
        elif key[-1] in ("scale", "embedding"):
            key = key[:-1] + ("weight",)
        tensors[".".join(key)] = np.ascontiguousarray(value)
    hf_model.config.save_pretrained(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def save_checkpoint(hf_model, directory, fmt: str) -> str:
    directory = str(directory)
    if fmt == "msgpack":
        hf_model.save_pretrained(directory)
    elif fmt == "safetensors_flax":
        hf_model.save_pretrained(directory, safe_serialization=True)
    else:
        save_pytorch_safetensors(hf_model, directory)
    return directory


def hf_hidden(hf_model, family, ids, mask, types=None):
    kwargs = {"token_type_ids": types} if family == "bert" else {}
    return np.asarray(hf_model(ids, attention_mask=mask, **kwargs).last_hidden_state)


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    """family -> (HF Flax model, directory of its msgpack checkpoint)."""
    out = {}
    for family in FAMILIES:
        model = BASE_MODELS[family](HF_CONFIGS[family](), seed=3)
        out[family] = (model, save_checkpoint(model, tmp_path_factory.mktemp(family), "msgpack"))
    return out


@pytest.mark.parametrize("eos", [50256, None])
def test_a_gpt2_checkpoint_whose_eos_id_is_not_in_its_vocabulary_loads_and_matches(eos, tmp_path):
    """GPT-2's config default eos id 50256 beside a small vocabulary, or no eos id: transformers
    loads both and our forward never reads the id, so the checkpoint loads and matches."""
    config = HF_CONFIGS["gpt2"]()
    config.eos_token_id = config.bos_token_id = eos
    hf_model = FlaxGPT2Model(config, seed=2)
    save_checkpoint(hf_model, tmp_path, "msgpack")
    classifier, params = load_pretrained(tmp_path)
    assert classifier.config.pad_token_id == 0  # neither id is a token: pads with 0, masked
    ids, mask = padded_batch(classifier.config.pad_token_id)
    ours, _ = classifier.hidden(params, {"input_ids": ids, "attention_mask": mask})
    err = max_err_at_real_tokens(ours, hf_hidden(hf_model, "gpt2", ids, mask), mask)
    assert err <= TOL


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors_flax", "safetensors_pt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_trunk_matches_hf_flax_hidden_states(family, fmt, tmp_path):
    hf_model = BASE_MODELS[family](HF_CONFIGS[family](), seed=1)
    save_checkpoint(hf_model, tmp_path, fmt)
    classifier, params = load_pretrained(tmp_path)  # no options: transformers' function
    ids, mask = padded_batch(classifier.config.pad_token_id)
    types = None
    if family == "bert":
        types = np.zeros_like(ids)
        types[0, 4:] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    ours, our_mask = classifier.hidden(params, batch)
    np.testing.assert_array_equal(our_mask, mask)
    err = max_err_at_real_tokens(ours, hf_hidden(hf_model, family, ids, mask, types), mask)
    assert err <= TOL, f"{family}/{fmt}: max abs error {err:.2e} at real tokens"


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_params_have_the_layout_of_classifier_init(family, base_checkpoints):
    classifier, params = load_pretrained(base_checkpoints[family][1])
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert shapes == jax.tree_util.tree_map(np.shape, classifier.init(0))
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_hot_input_equals_integer_ids(family, base_checkpoints):
    classifier, params = load_pretrained(base_checkpoints[family][1])
    ids, mask = padded_batch(classifier.config.pad_token_id, seed=4)
    one_hot = np.asarray(jax.nn.one_hot(ids, VOCAB, dtype=np.float32))
    by_ids, _ = classifier.hidden(params, {"input_ids": ids, "attention_mask": mask})
    by_onehot, _ = classifier.hidden(params, {"input_ids": one_hot, "attention_mask": mask})
    np.testing.assert_allclose(by_onehot, by_ids, rtol=0, atol=1e-6)


def test_minilm_softmax_hidden_states_match_transformers():
    directory = bundled_minilm_dir()
    assert (directory / "model.safetensors").is_file()  # PyTorch-layout safetensors
    tokenizer = load_tokenizer(directory)
    enc = tokenizer(
        ["Secure fine-tuning works.", "the hospital keeps its records", "hello"],
        padding=True,
        return_tensors="np",
    )
    mask = enc["attention_mask"].astype(np.float32)
    classifier, params = load_pretrained(directory, gelu_impl="exact")
    assert classifier.config.num_layers == 6 and classifier.config.hidden_size == 384
    batch = {"input_ids": enc["input_ids"], "attention_mask": mask}
    batch["token_type_ids"] = enc["token_type_ids"]
    ours, _ = classifier.hidden(params, batch)
    ref = FlaxBertModel.from_pretrained(str(directory), from_pt=True)(**enc).last_hidden_state
    err = max_err_at_real_tokens(ours, ref, mask)
    assert err <= TOL, f"MiniLM max abs error {err:.2e} at real tokens"


def test_mlm_head_on_a_checkpoint_without_one_is_refused():
    head = HeadConfig(kind="mlm", num_labels=2, verbalizer_ids=(2204, 2919))
    with pytest.raises(CheckpointError, match="masked-LM head"):
        load_pretrained(bundled_minilm_dir(), head=head)


def _randomise(params, path: tuple[str, ...], seed: int):
    """Replace a zero-initialised leaf (an output bias) by noise so that it is tested."""
    flat = flatten_dict(jax.tree_util.tree_map(np.asarray, params))
    flat[path] = np.random.default_rng(seed).normal(0, 0.5, flat[path].shape).astype(np.float32)
    return unflatten_dict(flat)


MLM_MODELS = {
    "bert": (FlaxBertForMaskedLM, ("cls", "predictions", "bias")),
    "roberta": (FlaxRobertaForMaskedLM, ("lm_head", "bias")),
}


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors_pt"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mlm_head_logits_match_hf_at_mask_position_and_verbalizer_ids(family, fmt, tmp_path):
    model_class, bias_path = MLM_MODELS[family]
    hf_model = model_class(HF_CONFIGS[family](), seed=2)
    hf_model.params = _randomise(hf_model.params, bias_path, seed=5)
    save_checkpoint(hf_model, tmp_path, fmt)
    verbalizer = (17, 42, 77)
    head = HeadConfig(kind="mlm", num_labels=3, verbalizer_ids=verbalizer)
    classifier, params = load_pretrained(tmp_path, head=head, gelu_impl="exact")
    assert set(params) == {classifier.trunk_name, classifier.head_name}
    ids, mask = padded_batch(classifier.config.pad_token_id, seed=6)
    positions = np.asarray([6, 3, 1])  # the "mask token" slot, inside each row's real tokens
    select = np.eye(ids.shape[1], dtype=np.float32)[positions]
    ours = classifier.logits(params, {"input_ids": ids, "attention_mask": mask, "select": select})
    ref = np.asarray(hf_model(ids, attention_mask=mask).logits)
    ref = ref[np.arange(len(positions)), positions][:, list(verbalizer)]
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= TOL, f"{family} MLM logits max abs error {err:.2e}"


@pytest.fixture(scope="module")
def gpt2_lm_checkpoint(tmp_path_factory):
    hf_model = FlaxGPT2LMHeadModel(HF_CONFIGS["gpt2"](), seed=7)
    return hf_model, save_checkpoint(hf_model, tmp_path_factory.mktemp("gpt2lm"), "msgpack")


def test_gpt2_lm_head_matches_hf_logits_at_last_real_token(gpt2_lm_checkpoint):
    hf_model, directory = gpt2_lm_checkpoint
    verbalizer = (11, 23)
    head = HeadConfig(kind="lm", num_labels=2, verbalizer_ids=verbalizer)
    classifier, params = load_pretrained(directory, head=head, gelu_impl="exact")
    ids, mask = padded_batch(classifier.config.pad_token_id, seed=8)
    last = np.asarray(LENGTHS) - 1
    select = np.eye(ids.shape[1], dtype=np.float32)[last]
    ours = classifier.logits(params, {"input_ids": ids, "attention_mask": mask, "select": select})
    ref = np.asarray(hf_model(ids, attention_mask=mask).logits)
    ref = ref[np.arange(len(last)), last][:, list(verbalizer)]
    err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= TOL, f"GPT-2 LM logits max abs error {err:.2e}"


def test_gpt2_prompt_at_position_zero_equals_prepended_token_embeddings(gpt2_lm_checkpoint):
    """A soft prompt equal to the embeddings of tokens t acts like feeding t first."""
    head = HeadConfig(kind="lm", num_labels=2, verbalizer_ids=(11, 23))
    classifier, params = load_pretrained(gpt2_lm_checkpoint[1], head=head)
    ids, mask = padded_batch(classifier.config.pad_token_id, seed=9)
    prefix = np.asarray([[30, 31, 32, 33]], np.int32)
    prompt = params["transformer"]["wte"]["embedding"][prefix]  # [1, P, H]
    select = np.eye(ids.shape[1], dtype=np.float32)[np.asarray(LENGTHS) - 1]
    batch = {"input_ids": ids, "attention_mask": mask, "select": select}
    with_prompt = classifier.logits(params, batch, prompt=prompt)
    p = prefix.shape[1]
    joined = {
        "input_ids": np.concatenate([np.repeat(prefix, len(ids), 0), ids], axis=1),
        "attention_mask": np.concatenate([np.ones((len(ids), p), np.float32), mask], axis=1),
        "select": np.concatenate([np.zeros((len(ids), p), np.float32), select], axis=1),
    }
    np.testing.assert_allclose(with_prompt, classifier.logits(params, joined), atol=1e-5)


def test_gpt2_layer_slices_compose_to_the_full_stack(base_checkpoints):
    classifier, params = load_pretrained(base_checkpoints["gpt2"][1])
    decoder, trunk = Decoder(classifier.config), {"params": params["transformer"]}
    ids, mask = padded_batch(classifier.config.pad_token_id)
    full, _ = decoder.apply(trunk, ids, mask)
    lower, lower_mask = decoder.apply(trunk, ids, mask, num_layers=1)
    upper, _ = decoder.apply(trunk, lower, lower_mask, embed=False, first_layer=1)
    np.testing.assert_allclose(upper, full, atol=1e-6)
    assert np.abs(np.asarray(lower) - np.asarray(full)).max() > 1e-3  # ln_f only at the top


CAUSAL_ATTENTIONS = {
    "softmax": AttentionConfig(kind="softmax"),
    "rfa_l2_exact": AttentionConfig(kind="rfa", variant="l2", trig="exact", num_features=16),
    "rfa_l2_poly": AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=16),
}


@pytest.mark.parametrize("name", sorted(CAUSAL_ATTENTIONS))
def test_gpt2_changing_a_later_token_leaves_earlier_positions_unchanged(name, base_checkpoints):
    classifier, params = load_pretrained(base_checkpoints["gpt2"][1], CAUSAL_ATTENTIONS[name])
    ids, mask = padded_batch(classifier.config.pad_token_id, seed=10)
    changed = ids.copy()
    changed[0, 5] = (ids[0, 5] + 1) % VOCAB
    before, _ = classifier.hidden(params, {"input_ids": ids, "attention_mask": mask})
    after, _ = classifier.hidden(params, {"input_ids": changed, "attention_mask": mask})
    before, after = np.asarray(before), np.asarray(after)
    np.testing.assert_allclose(after[0, :5], before[0, :5], rtol=0, atol=1e-6)
    assert np.abs(after[0, 5:] - before[0, 5:]).max(axis=-1).min() > 1e-4
    np.testing.assert_array_equal(after[1:], before[1:])


# --- errors: one line, naming the problem and the path --------------------------------


def _assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_directory_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as error:
        load_pretrained(missing)
    _assert_one_line(error, "not found", str(missing))


def test_directory_without_config_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    _assert_one_line(error, "no config.json", str(tmp_path))


def test_directory_without_weights_is_a_one_line_error(tmp_path):
    HF_CONFIGS["bert"]().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    _assert_one_line(error, "no weights file", str(tmp_path))


@pytest.mark.parametrize("fmt", ["msgpack", "safetensors_pt"])
def test_truncated_weights_file_is_a_one_line_error(fmt, base_checkpoints, tmp_path):
    hf_model = base_checkpoints["bert"][0]
    save_checkpoint(hf_model, tmp_path, fmt)
    weights = tmp_path / ("flax_model.msgpack" if fmt == "msgpack" else "model.safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    _assert_one_line(error, "weights", str(weights))


def test_garbage_weights_file_is_a_one_line_error(base_checkpoints, tmp_path):
    HF_CONFIGS["gpt2"]().save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(b"\x00not a msgpack file" * 10)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    _assert_one_line(error, "weights", str(tmp_path))


@pytest.mark.parametrize("model_type", ["t5", "mistral", "not_a_model"])
def test_unsupported_model_type_is_a_one_line_error(model_type, tmp_path):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    with pytest.raises(CheckpointError) as error:
        load_pretrained(tmp_path)
    _assert_one_line(error, model_type, str(tmp_path))
