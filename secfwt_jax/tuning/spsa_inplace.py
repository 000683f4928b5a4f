"""Memory-lean SPSA (MeZO's in-place trick), plaintext only: a host sequence of jits.

MeZO (Malladi et al. 2023) keeps one copy of the parameters theta by perturbing them in
place and regenerating z from a seed instead of storing it. Functionally in JAX, every
step below is its own `jax.jit` with theta DONATED, so XLA writes the result into theta's
buffer and never holds a second copy:

    for k in 0..K-1:
        theta <- theta + eps z_k              shift   (z_k regenerated from the key)
        L+_k  <- L(theta)                     loss    (theta read, not donated)
        theta <- theta - 2 eps z_k            shift
        L-_k  <- L(theta)                     loss
        theta <- theta + eps z_k              shift   (k < K-1; for k = K-1 fused below)
    g_k   = (L+_k - L-_k) / (2 eps)
    theta <- (theta + eps z_{K-1}) (1 - eta wd) - eta / K sum_k g_k z_k       update

Each jit's peak is then about max(theta + a few chunks of z, theta + one forward's
activations), i.e. one forward pass: see benchmarks/results/memory.md. All K directions
are evaluated at the same theta, so this is `spsa.spsa_step_seeded`'s algorithm, with
these differences:

* Rounding: ((theta + eps z) - 2 eps z) + eps z is not theta exactly in float32 (about one
  ulp of |theta| per restore), so results match the seeded step to float tolerance, not
  bit for bit. MeZO has the same drift.
* Directions: leaf i's key is `jax.random.split(key, num_leaves)[i]`, as in
  `spsa_step_seeded`. A leaf whose K * size <= `chunk_elements` draws
  `normal(key_i, [K, *shape])[k]`: exactly the seeded step's z, for every K. A larger leaf
  (e.g. a word embedding) draws z in flat blocks of `chunk_elements`, block b of
  direction k from `fold_in(fold_in(key_i, k), b)` (the last block ends at the leaf's
  end and uses only its new entries), because XLA materialises a whole leaf's random
  bits (about 2x the leaf) otherwise. Those leaves follow another (equally
  Gaussian) stream than the seeded step; `chunk_elements=None` never chunks and then
  matches `spsa_step_seeded` for every leaf, at the cost of that peak.
* Donation: the caller's trainable arrays are INVALID after a step (their buffers were
  reused; reading them raises). Use only the returned trainable. Numpy inputs are copied
  to the device first, so they stay valid; keep a copy (`jnp.array(x, copy=True)`) of
  any jax array you still need.
* Cost: 5K dispatches per step (3K-1 shifts, 2K losses, 1 update), and z is
  regenerated 3K times instead of once (a small leaf draws all K directions each time);
  forwards run one at a time (like `SpsaConfig(batched=False)`), so `config.batched` is
  ignored.

Do not compile any of this for SPU (`jax.random` is wrong there, and SPU has no buffer
donation); the MPC path is `spsa.spsa_step` with public host-drawn z.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from secfwt_jax.tuning.spsa import DEFAULT_SPSA, LossFn, PyTree, SpsaConfig

DEFAULT_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 z drawn at a time


def _leaf_keys(key: jax.Array, num_leaves: int) -> jax.Array:
    return jax.random.split(key, num_leaves)  # the same per-leaf keys as spsa_step_seeded


def _is_chunked(leaf, num_directions: int, chunk_elements: int | None) -> bool:
    return chunk_elements is not None and num_directions * leaf.size > chunk_elements


def _map_blocks(flat, block_fn: Callable, chunk: int):
    """flat [n] -> flat with block b replaced by block_fn(b, flat[block b]), in place.

    Every block has `chunk` entries; the last one ends at n and overlaps its predecessor,
    whose entries it leaves alone. One uniform `fori_loop` keeps XLA's update in place: a
    separate remainder slice after the loop makes it copy the whole leaf.
    """
    n = flat.shape[0]
    chunk = min(chunk, n)

    def body(b, x):
        start = jnp.minimum(b * chunk, n - chunk)
        block = jax.lax.dynamic_slice(x, (start,), (chunk,))
        fresh = start + jnp.arange(chunk) >= b * chunk
        new = jnp.where(fresh, block_fn(b, block), block)
        return jax.lax.dynamic_update_slice(x, new, (start,))

    return jax.lax.fori_loop(0, -(-n // chunk), body, flat)


def _map_leaf(leaf, leaf_key, fn: Callable, num_directions: int, chunk_elements):
    """leaf -> fn(leaf_block, z_of) where z_of(k) is direction k's z on that block."""
    if not _is_chunked(leaf, num_directions, chunk_elements):
        z = jax.random.normal(leaf_key, (num_directions,) + leaf.shape, leaf.dtype)
        return fn(leaf, lambda k: z[k])

    def block_fn(b, block):
        def z_of(k):
            block_key = jax.random.fold_in(jax.random.fold_in(leaf_key, k), b)
            return jax.random.normal(block_key, block.shape, block.dtype)

        return fn(block, z_of)

    return _map_blocks(leaf.reshape(-1), block_fn, chunk_elements).reshape(leaf.shape)


@dataclasses.dataclass(frozen=True)
class InplaceSpsaStep:
    """`step(trainable, frozen, batch, key, step_size) -> (trainable, info)`; see module doc.

    info = {loss [], loss_plus [K], loss_minus [K], projected_grad [K]}, as `spsa_step`.
    The jitted parts are exposed for memory measurement (benchmarks/memory.py):
      shift(trainable, key, k, scale)                 -> trainable + scale z_k   (donated)
      loss(trainable, frozen, batch)                  -> []
      update(trainable, key, loss_plus, loss_minus, step_size) -> (trainable, info) (donated)
    """

    config: SpsaConfig
    shift: Callable
    loss: Callable
    update: Callable

    def __call__(self, trainable, frozen, batch, key, step_size) -> tuple[PyTree, dict]:
        eps, num = self.config.eps, self.config.num_directions
        plus, minus = [], []
        for k in range(num):
            trainable = self.shift(trainable, key, k, eps)
            plus.append(self.loss(trainable, frozen, batch))
            trainable = self.shift(trainable, key, k, -2.0 * eps)
            minus.append(self.loss(trainable, frozen, batch))
            if k < num - 1:
                trainable = self.shift(trainable, key, k, eps)
        return self.update(trainable, key, jnp.stack(plus), jnp.stack(minus), step_size)


def make_inplace_spsa_step(
    loss_fn: LossFn,
    config: SpsaConfig = DEFAULT_SPSA,
    chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS,
) -> InplaceSpsaStep:
    """Build MeZO's in-place SPSA step for `loss_fn(trainable, frozen, batch) -> []`.

    chunk_elements: most z entries drawn at once (None: whole leaves, matching
    `spsa_step_seeded`'s directions exactly but peaking at about 2 * K * the largest leaf).
    """
    if not isinstance(config, SpsaConfig):
        raise TypeError("inplace_spsa.config: must be a SpsaConfig")
    if chunk_elements is not None and (
        isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int)
    ):
        raise TypeError("inplace_spsa.chunk_elements: must be an int or None")
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError("inplace_spsa.chunk_elements: must be >= 1")
    num, eps = config.num_directions, config.eps

    def map_tree(trainable, key, fn):
        leaves, treedef = jax.tree_util.tree_flatten(trainable)
        keys = _leaf_keys(key, len(leaves))
        new = [_map_leaf(x, keys[i], fn, num, chunk_elements) for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, new)

    def shift(trainable, key, k, scale):
        return map_tree(trainable, key, lambda x, z_of: x + scale * z_of(k))

    def update(trainable, key, loss_plus, loss_minus, step_size):
        grad = (loss_plus - loss_minus) * (1.0 / (2.0 * eps))
        decay = 1.0 - step_size * config.weight_decay

        def restore_and_step(x, z_of):
            direction = sum(grad[k] * z_of(k) for k in range(num)) * (1.0 / num)
            return (x + eps * z_of(num - 1)) * decay - step_size * direction

        info = {
            "loss": 0.5 * (jnp.mean(loss_plus) + jnp.mean(loss_minus)),
            "loss_plus": loss_plus,
            "loss_minus": loss_minus,
            "projected_grad": grad,
        }
        return map_tree(trainable, key, restore_and_step), info

    return InplaceSpsaStep(
        config=config,
        shift=jax.jit(shift, donate_argnums=0),
        loss=jax.jit(loss_fn),
        update=jax.jit(update, donate_argnums=0),
    )
