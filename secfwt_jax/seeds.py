"""Private seeds: an owner's randomness (inline weights, a fresh head, LoRA factors).

Whoever learns a private seed learns everything drawn from it, and an attacker who can test a
guess (the data owner holds its data and its revealed losses; the spec is public) searches
the seed space. So a private seed carries `PRIVATE_SEED_BITS` bits from the OS
(`fresh_private_seed`), and every draw keeps all of them: numpy draws go through
`np.random.SeedSequence([seed, stream])`, which takes integers of any size, and Flax
initialisation gets an ``rbg`` key (128 bits of key data, `private_key`) instead of a
threefry `PRNGKey`, whose 64 bits would cap the search at 2^64.

A seed that a person chose (``--private-seed 0``) is as guessable as the choice: it exists
for tests and for reproducing a published figure, never for a deployment.
"""

from __future__ import annotations

import secrets

import numpy as np

#: Bits of OS entropy in a fresh private seed.
PRIVATE_SEED_BITS = 128


def fresh_private_seed() -> int:
    """A private seed of `PRIVATE_SEED_BITS` bits from the OS (`secrets`)."""
    return secrets.randbits(PRIVATE_SEED_BITS)


def check_private_seed(seed: int, field: str = "--private-seed") -> int:
    """Refuse, in one line naming `field`, a seed that is not a non-negative integer."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{field}: must be a non-negative integer, got {seed!r}")
    return int(seed)


def private_key(seed: int, stream: int):
    """A JAX ``rbg`` key whose 128 bits of key data come from ``SeedSequence([seed, stream])``."""
    import jax

    words = np.random.SeedSequence([check_private_seed(seed, "seed"), stream]).generate_state(4, np.uint32)  # fmt: skip
    return jax.random.wrap_key_data(words, impl="rbg")


__all__ = ["PRIVATE_SEED_BITS", "check_private_seed", "fresh_private_seed", "private_key"]
