"""Attention adaptation: distilling a tiny RFA model towards its softmax original lowers
the distillation loss and brings its hidden states closer to the teacher's."""

import jax
import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning import adaptation
from secfwt_jax.tuning.trainable import partition

SOFTMAX = ModelConfig(
    family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
    intermediate_size=32, max_positions=24, type_vocab_size=2, pad_token_id=0,
)  # fmt: skip


def classifier(attention: AttentionConfig) -> Classifier:
    return Classifier(SOFTMAX.with_attention(attention), HeadConfig(num_labels=2, pooling="mean"))


def corpus_batch(rows=8, seq=10, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((rows, seq), np.float32)
    mask[0, 7:] = 0
    return {"input_ids": rng.integers(4, 40, (rows, seq)), "attention_mask": mask}


@pytest.fixture(scope="module")
def models():
    teacher = classifier(AttentionConfig())
    student = classifier(AttentionConfig(kind="rfa", variant="l2", num_features=8))
    return student, teacher, teacher.init(0)


@pytest.mark.parametrize("param_set", ["attention", "qk"])
def test_adapt_attention_brings_rfa_hidden_states_closer_to_softmax(models, param_set):
    student, teacher, params = models
    train, held_out = corpus_batch(seed=0), corpus_batch(seed=1)
    before = adaptation.distillation_distance(student, params, teacher, params, held_out)
    adapted, history = adaptation.adapt_attention(
        student, params, teacher, train, steps=60, learning_rate=1e-2, param_set=param_set
    )
    after = adaptation.distillation_distance(student, adapted, teacher, params, held_out)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert after < before
    # Only the selected set moved; the teacher's tree is untouched.
    moved, kept = partition(adapted, adaptation.ADAPT_SETS[param_set])
    orig_moved, orig_kept = partition(params, adaptation.ADAPT_SETS[param_set])
    assert any(
        not np.allclose(a, b) for a, b in zip(_leaves(moved), _leaves(orig_moved), strict=True)
    )
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(kept), _leaves(orig_kept), strict=True))


def test_layer_hidden_states_last_layer_matches_the_trunk(models):
    student, _, params = models
    batch = corpus_batch()
    states = adaptation.layer_hidden_states(student, params, batch)
    hidden, _ = student.hidden(params, batch)
    assert states.shape == (2, 8, 10, 16)
    np.testing.assert_allclose(states[-1], hidden, atol=1e-5)


def test_adapt_attention_rejects_unknown_param_set(models):
    student, teacher, params = models
    with pytest.raises(ValueError, match="adaptation.param_set"):
        adaptation.adapt_attention(student, params, teacher, corpus_batch(), 1, 1e-3, "ffn")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_rfa_normaliser_floor_is_the_smallest_real_normaliser_per_layer():
    import dataclasses

    from secfwt_jax.models.attention import rfa_features

    rfa_normaliser_floor = adaptation.rfa_normaliser_floor
    rfa = AttentionConfig(kind="rfa", variant="l2", trig="poly", num_features=8)
    cfg = ModelConfig(family="bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                      intermediate_size=32, max_positions=16, type_vocab_size=2, attention=rfa)  # fmt: skip
    clf = Classifier(cfg, HeadConfig(num_labels=2))
    params = clf.init(3, seq_len=6)
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    batch = {"input_ids": rng.integers(1, 40, (2, 6)).astype(np.int32), "attention_mask": mask,
             "token_type_ids": np.zeros((2, 6), np.int32)}  # fmt: skip
    floors = rfa_normaliser_floor(clf, params, batch)
    assert len(floors) == 2
    # layer 0 by hand: embeddings -> q, k -> features -> phi(q) . sum over real keys phi(k)
    hidden, key_mask = clf.lower_hidden(params, batch, num_layers=0)
    proj = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]
    q, k = (np.asarray(hidden @ proj[n]["kernel"] + proj[n]["bias"]).reshape(2, 6, 2, 8) for n in ("query", "key"))  # fmt: skip
    phi_q, phi_k = (np.asarray(a) for a in rfa_features(q, k, key_mask, rfa, 0))
    den = np.einsum("bnhf,bhf->bnh", phi_q, (phi_k * mask[:, :, None, None]).sum(axis=1))
    np.testing.assert_allclose(floors[0], np.abs(den[mask.astype(bool)]).min(), rtol=1e-5)
    softmax = Classifier(dataclasses.replace(cfg, attention=AttentionConfig()), HeadConfig(num_labels=2))  # fmt: skip
    assert rfa_normaliser_floor(softmax, params, batch) == []


def test_normaliser_shortfall_by_hand():
    # [L=1, B=1, N=3, heads=2]; the third token is padding and must not count.
    den = np.array([[[[0.2, 0.05], [0.0, -0.1], [0.0, 0.0]]]], np.float32)
    mask = np.array([[1, 1, 0]], np.float32)
    # relu(1 - den / 0.1)^2 per real (token, head): 0, 0.25, 1, 4 -> mean 1.3125
    got = adaptation.normaliser_shortfall(den, mask, margin=0.1)
    np.testing.assert_allclose(float(got), 1.3125, rtol=1e-6)


def test_normaliser_term_keeps_rfa_normalisers_above_the_margin(models):
    """Training with the term ends with fewer normalisers under the margin than without."""
    student, teacher, params = models
    train, held_out = corpus_batch(seed=0), corpus_batch(seed=1)
    floor0 = min(adaptation.rfa_normaliser_floor(student, params, held_out))
    margin = 4 * floor0  # a margin the pretrained tree misses on some tokens

    def shortfall(p, batch):
        states = adaptation.layer_states(student, p, batch)
        den = adaptation.rfa_normalisers(student, p, states, batch["attention_mask"])
        return float(adaptation.normaliser_shortfall(den, batch["attention_mask"], margin))

    runs = {}
    for weight in (0.0, 1.0):
        runs[weight], _ = adaptation.adapt_attention(
            student, params, teacher, train, steps=60, learning_rate=1e-2,
            normaliser_margin=margin, normaliser_weight=weight,
        )  # fmt: skip
    assert shortfall(params, train) > 0
    assert shortfall(runs[1.0], train) < 0.5 * shortfall(runs[0.0], train)
    # the distance alone (weight 0) is what distillation_distance reports either way
    plain = adaptation.distillation_distance(student, runs[1.0], teacher, params, held_out)
    with_term = adaptation.distillation_loss_fn(student, teacher, params, margin, 1.0)
    assert (
        float(with_term({}, runs[1.0], {k: held_out[k] for k in ("input_ids", "attention_mask")}))
        >= plain
    )
