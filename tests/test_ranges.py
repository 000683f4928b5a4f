"""The model owner bounds what the program computes before sharing its weights: a product
that would overflow SPU's fixed point and reach the outputs is refused in one line naming
a weight; a piecewise activation's discarded out-of-range polynomial is not."""

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from secfwt_jax.models.checkpoint import bundled_minilm_dir
from secfwt_jax.models.mpc_ops import gelu_piecewise
from secfwt_jax.run.ranges import find_overflow, product_bound
from secfwt_jax.runtime import cli

ROOT = Path(__file__).resolve().parents[1]
LIMIT = product_bound(64, 18) / 16


def _layer(w, x):
    h = x @ w["dense"]
    return jnp.mean(h * h, axis=-1)  # a norm's variance: the product that overflows


def test_fixed_point_product_bound():
    assert product_bound(64, 18) == 2.0**27
    assert product_bound(128, 26) == 2.0**75


def test_a_product_past_the_bound_that_reaches_the_outputs_is_found_and_named():
    x = np.ones((2, 8), np.float32)
    small = {"dense": np.full((8, 4), 0.1, np.float32)}
    assert find_overflow(_layer, (small, x), ("weights", None), LIMIT) is None
    big = {"dense": np.full((8, 4), 5000.0, np.float32)}  # h = 40,000; h * h = 1.6e9
    found = find_overflow(_layer, (big, x), ("weights", None), LIMIT)
    assert found is not None and found.primitive == "mul" and found.peak == pytest.approx(1.6e9)
    assert found.source == "weights['dense']"


def test_the_weight_named_is_the_one_that_entered_last():
    def two_layers(w, x):
        h = x @ w["first"]
        return _layer({"dense": w["second"]}, h)

    w = {"first": np.full((8, 8), 0.1, np.float32), "second": np.full((8, 4), 5000.0, np.float32)}
    found = find_overflow(two_layers, (w, np.ones((2, 8), np.float32)), ("w", None), LIMIT)
    assert found is not None and found.source == "w['second']"


def test_a_discarded_out_of_range_polynomial_is_not_an_overflow():
    """gelu_piecewise evaluates its polynomial at every x, far outside [-B, B] too, then
    selects x or 0 there: the wrapped value never reaches the output, in SPU or here."""
    x = np.linspace(-3000, 3000, 64, dtype=np.float32)
    scale = {"s": np.ones(64, np.float32)}
    assert find_overflow(lambda w, v: gelu_piecewise(v * w["s"]), (scale, x), ("w", None), LIMIT) is None  # fmt: skip

    # the same magnitudes used outright do reach the output
    def cube(w, v):
        u = v * w["s"]
        return u * u * u

    assert find_overflow(cube, (scale, x), ("w", None), LIMIT) is not None


@pytest.fixture(scope="module")
def scaled_minilm(tmp_path_factory) -> Path:
    """The bundled MiniLM with every weight times 5000: each value passes the input bound
    (8192), and the first LayerNorm's squares overflow."""
    source, out = bundled_minilm_dir(), tmp_path_factory.mktemp("scaled")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):  # fmt: skip
        shutil.copy(source / name, out / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v * np.float32(5000) for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    return out


def test_a_model_whose_weights_overflow_is_refused_before_anything_is_shared(scaled_minilm, tmp_path, capsys):  # fmt: skip
    argv = ["finetune", str(ROOT / "configs" / "minilm_sentiment.yaml"), "--out", str(tmp_path / "run"),
            "--set", f"model.checkpoint={scaled_minilm}", "--set", "model.adapted_checkpoint=null",
            "--set", "tuning.steps=1", "--set", "evaluation.mpc_examples=16", "--private-seed", "0"]  # fmt: skip
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("secfwt: error: frozen['bert']['embeddings']")
    assert "on a probe of ordinary text, past 8.39e+06" in err and "protocol.field FM128" in err
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # nothing written
