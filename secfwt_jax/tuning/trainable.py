"""Split a parameter tree into a trainable part and a frozen part, and merge them back.

The frozen remainder stays a separate pytree because under MPC it is the model owner's
secret and never changes; only the trainable part is perturbed and updated. Paths are
'/'-joined Hugging Face names, e.g. `bert/encoder/layer/0/attention/self/query/bias`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.traverse_util as traverse

PathPredicate = Callable[[str], bool]


def partition(params: dict, is_trainable: PathPredicate) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts; every leaf lands in exactly one of them."""
    flat = traverse.flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    if not trainable:
        raise ValueError("trainable: the selection matches no parameter")
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse.unflatten_dict(trainable, sep="/"), traverse.unflatten_dict(frozen, sep="/")


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`."""
    flat = traverse.flatten_dict(frozen, sep="/")
    flat.update(traverse.flatten_dict(trainable, sep="/"))
    return traverse.unflatten_dict(flat, sep="/")


def head_only(head_name: str) -> PathPredicate:
    return lambda path: path.split("/")[0] == head_name


def biases_only(head_name: str) -> PathPredicate:
    """BitFit: every bias, plus the task head."""
    return lambda path: path.endswith("/bias") or path.split("/")[0] == head_name


def everything(_: str) -> bool:
    return True
