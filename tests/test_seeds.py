"""Private seeds carry 128 bits from the OS, and every bit reaches what is drawn from them
(a 31-bit seed was brute-forced from one revealed loss; a threefry key would cap the
search at 2^64)."""

import argparse

import jax
import numpy as np
import pytest

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.models.config import ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.runtime import cli
from secfwt_jax.seeds import PRIVATE_SEED_BITS, check_private_seed, fresh_private_seed

CONFIG = ModelConfig(family="bert", vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                     intermediate_size=32, max_positions=16, type_vocab_size=2)  # fmt: skip
SEED = 0x5EC_F00D_0123_4567_89AB_CDEF_0011_2233


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_fresh_seeds_have_128_bits():
    bits = [fresh_private_seed().bit_length() for _ in range(64)]
    assert PRIVATE_SEED_BITS == 128 and max(bits) <= 128 and min(bits) > 100


@pytest.mark.parametrize("bit", [0, 40, 70, 100, 127])
def test_every_bit_of_the_seed_changes_the_inline_weights_and_the_head(bit):
    classifier = Classifier(CONFIG, HeadConfig(num_labels=2))
    base = classifier.init(SEED)
    assert _same(base, classifier.init(SEED))  # deterministic
    other = classifier.init(SEED ^ (1 << bit))
    trunk, head = classifier.trunk_name, classifier.head_name
    assert not _same(base[trunk], other[trunk]), f"bit {bit} did not reach the trunk"
    assert not _same(base[head], other[head]), f"bit {bit} did not reach the head"


def test_a_bad_seed_is_refused_in_one_line():
    for bad in (-1, 1.5, "7", True):
        with pytest.raises(ValueError, match=r"^--private-seed: must be a non-negative integer"):
            check_private_seed(bad)


def test_a_chosen_seed_is_accepted_with_a_warning_and_none_draws_from_the_os(capsys):
    assert cli._given_seed(argparse.Namespace(private_seed=None)) is None
    assert capsys.readouterr().err == ""
    assert cli._given_seed(argparse.Namespace(private_seed=3)) == 3
    assert "as guessable as the seed you chose" in capsys.readouterr().err
