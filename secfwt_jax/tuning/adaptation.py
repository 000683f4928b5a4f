"""Attention adaptation: distil a random-feature-attention (RFA) model towards its softmax
original, in plaintext, before any MPC run.

Swapping softmax attention for RFA in a softmax-pretrained checkpoint shifts every layer's
hidden states, and a frozen-feature probe loses points before any tuning; so does swapping
GeLU for a cheaper stand-in (`ModelConfig.gelu_impl` "relu" or "quad"). The MODEL OWNER
repairs part of that on their own, with public unlabelled text and their own weights:

    h_l^T = the original model's hidden states after layer l (teacher: softmax, GeLU; frozen)
    h_l^S = the MPC model's hidden states after layer l (student: RFA, maybe relu/quad;
            same weights to start)
    L     = 1/L sum_l  sum_{b,n} m_bn |h_l^S - h_l^T|^2 / (H sum_{b,n} m_bn)
            + w * 1/L sum_l  mean_{real b,n, heads} relu(1 - den_l / margin)^2

The second term keeps RFA's normalisers den = phi(q) . sum_k phi(k) away from zero.
Trigonometric features are not positive, and an adaptation that only matches hidden
states can drive some normalisers towards zero (measured: 1.7e-3 on real text after 600
steps, against >= 0.12 before); there the fixed-point MPC forward's small feature errors
become large relative errors. `secfwt adapt` uses margin 0.1 and w = 1 by default.

minimised with `jax.grad` + Adam over a small parameter set (`ADAPT_SETS`); everything
else stays at the pretrained values. RFA's random directions are public and FIXED: they
live in `AttentionConfig.seed`, not in `params`, so no selection can move them. The result
is an ordinary parameter tree: the owner secret-shares it exactly like the original.

    params = adapt_attention(rfa_classifier, params, softmax_classifier, corpus_batches,
                             steps=300, learning_rate=1e-3, param_set="attention")

Why there is no temperature parameter: the l2 variant normalises q and k before the
feature map, so scaling the q/k projections cannot sharpen or flatten the kernel; only
`AttentionConfig.sigma` (public, one value for the model) sets its width. A per-head
learnable temperature would need a new parameter in the attention module, which a Hugging
Face tree lacks; it is left out.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secfwt_jax.models.classifier import Classifier, trunk_module
from secfwt_jax.tuning import trainable as tr

#: Parameter sets the adaptation may move ('/'-joined Hugging Face paths).
ADAPT_SETS: dict[str, tr.PathPredicate] = {
    "qk": lambda p: "attention/self/query" in p or "attention/self/key" in p,
    "attention": lambda p: "/attention/" in p,  # q, k, v, output dense and its LayerNorm
    "layernorm": lambda p: "LayerNorm" in p and "/encoder/" in p,
    # every transformer layer (attention, FFN, LayerNorms): for a GeLU stand-in ("relu",
    # "quad"), whose error the FFN weights must absorb as well as RFA's.
    "encoder": lambda p: "/encoder/" in p or "/h/" in p,
}


def default_param_set(gelu_impl: str) -> str:
    """ "attention" when only the attention changed; "encoder" when the GeLU did too."""
    return "attention" if gelu_impl in ("piecewise", "exact") else "encoder"


BatchSource = dict | Callable[[int], dict]


def layer_states(classifier: Classifier, params: dict, batch: dict) -> jnp.ndarray:
    """The embeddings' output, then the hidden states after every trunk layer: [L+1, B, N, H].

    Entry l is the input of layer l (post-LN BERT/RoBERTa); entry l+1 is its output."""
    module = trunk_module(classifier.config)
    trunk = {"params": params[classifier.trunk_name]}
    hidden, mask = module.apply(
        trunk, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
        num_layers=0,
    )  # fmt: skip
    states = [hidden]
    for layer in range(classifier.config.num_layers):
        hidden, mask = module.apply(
            trunk, hidden, mask, embed=False, first_layer=layer, num_layers=1
        )
        states.append(hidden)
    return jnp.stack(states)


def layer_hidden_states(classifier: Classifier, params: dict, batch: dict) -> jnp.ndarray:
    """Hidden states after every trunk layer: [L, B, N, H] (embeddings excluded)."""
    return layer_states(classifier, params, batch)[1:]


def hidden_state_distance(student: jnp.ndarray, teacher: jnp.ndarray, mask) -> jnp.ndarray:
    """Masked MSE between [L, B, N, H] stacks, averaged over layers, real tokens and H."""
    weights = jnp.asarray(mask, jnp.float32)[None, :, :, None]
    sq = jnp.sum(weights * (student - teacher) ** 2, axis=(1, 2, 3))
    per_layer = sq / (jnp.sum(weights) * student.shape[-1])
    return jnp.mean(per_layer)


def _batch_at(source: BatchSource, step: int) -> dict:
    return source(step) if callable(source) else source


def normaliser_shortfall(normalisers: jnp.ndarray, mask, margin: float) -> jnp.ndarray:
    """Mean over layers, real tokens and heads of relu(1 - den / margin)^2 ([L, B, N, h] -> []).

    0 when every normaliser is at least `margin`; 1 per token at den = 0 (more if negative)."""
    weights = jnp.asarray(mask, jnp.float32)[None, :, :, None]
    short = jnp.square(jax.nn.relu(1.0 - normalisers / margin))
    per_layer = jnp.sum(weights * short, axis=(1, 2, 3)) / (
        jnp.sum(weights) * normalisers.shape[-1]
    )
    return jnp.mean(per_layer)


def distillation_loss_fn(
    student: Classifier,
    teacher: Classifier,
    teacher_params: dict,
    normaliser_margin: float = 0.0,
    normaliser_weight: float = 0.0,
):
    """(trainable, frozen, batch) -> loss []; the teacher is a constant.

    The loss is the hidden-state distance, plus `normaliser_weight` times the student's RFA
    normaliser shortfall below `normaliser_margin` (`normaliser_shortfall`) when both are
    positive and the student has RFA normalisers (`rfa_normalisers`)."""
    penalise = normaliser_margin > 0 and normaliser_weight > 0 and _has_normalisers(student)

    def loss(trainable, frozen, batch):
        target = jax.lax.stop_gradient(layer_hidden_states(teacher, teacher_params, batch))
        merged = tr.merge(trainable, frozen)
        states = layer_states(student, merged, batch)
        total = hidden_state_distance(states[1:], target, batch["attention_mask"])
        if penalise:
            den = rfa_normalisers(student, merged, states[:-1], batch["attention_mask"])
            total = total + normaliser_weight * normaliser_shortfall(
                den, batch["attention_mask"], normaliser_margin
            )
        return total

    return loss


def adapt_attention(
    student: Classifier,
    params: dict,
    teacher: Classifier,
    batches: BatchSource,
    steps: int,
    learning_rate: float,
    param_set: str = "attention",
    teacher_params: dict | None = None,
    log: Callable[[str], None] | None = None,
    normaliser_margin: float = 0.0,
    normaliser_weight: float = 0.0,
) -> tuple[dict, list[dict]]:
    """Distil the RFA `student` towards the softmax `teacher` on public unlabelled text.

    Args:
      student: the RFA classifier (its `config.attention.kind == 'rfa'`).
      params: the pretrained tree both models start from; the head is left untouched.
      teacher: the softmax classifier with the same architecture.
      batches: a raw batch (`input_ids`, `attention_mask`[, `token_type_ids`]), or
        step -> batch; labels are not read.
      steps, learning_rate: Adam steps and constant step size.
      param_set: a key of `ADAPT_SETS`.
      teacher_params: the teacher's tree (default: `params`).
      normaliser_margin, normaliser_weight: keep the student's RFA normalisers above the
        margin (`distillation_loss_fn`); 0 turns the term off.

    Returns:
      (adapted params, history [{step, loss}]) where loss is the value before the step.
    """
    if param_set not in ADAPT_SETS:
        raise ValueError(f"adaptation.param_set: unknown {param_set!r}; use {sorted(ADAPT_SETS)}")
    teacher_params = params if teacher_params is None else teacher_params
    trainable, frozen = tr.partition(params, ADAPT_SETS[param_set])
    loss_fn = distillation_loss_fn(
        student, teacher, teacher_params, normaliser_margin, normaliser_weight
    )
    opt = optax.adam(learning_rate)

    @jax.jit
    def step_fn(t, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(t, frozen, batch)
        updates, state = opt.update(grads, state, t)
        return optax.apply_updates(t, updates), state, loss

    state, history = opt.init(trainable), []
    for step in range(steps):
        batch = _keys_for_trunk(_batch_at(batches, step))
        trainable, state, loss = step_fn(trainable, state, batch)
        history.append({"step": step, "loss": float(loss)})
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"adapt step {step}: distillation loss {float(loss):.5f}")
    adapted = tr.merge(jax.tree_util.tree_map(np.asarray, trainable), frozen)
    return adapted, history


def distillation_distance(
    student: Classifier, params: dict, teacher: Classifier, teacher_params: dict, batch: dict
) -> float:
    """The distillation loss of `params` on one batch (no update): a fidelity diagnostic."""
    fn = jax.jit(distillation_loss_fn(student, teacher, teacher_params))
    return float(fn({}, params, _keys_for_trunk(batch)))


def _keys_for_trunk(batch: dict) -> dict:
    """Only what the trunk reads (drops labels etc. so jit traces one signature)."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


#: Below this |normaliser| an RFA layer's fixed-point output drifts visibly from plaintext
#: (an attention-adapted MiniLM at 1.7e-3 lost 3% MPC/plaintext agreement; the base
#: checkpoint's floor is 0.12). `secfwt adapt` warns under it.
NORMALISER_FLOOR_WARN = 0.05
#: `secfwt adapt`'s defaults for the normaliser term of the loss: twice the warning level,
#: and a weight at which a token with den = 0 costs 20x the adapted model's hidden-state
#: distance (about 0.05 on MiniLM).
NORMALISER_MARGIN = 0.1
NORMALISER_WEIGHT = 1.0


def _has_normalisers(classifier: Classifier) -> bool:
    cfg = classifier.config
    return cfg.attention.kind == "rfa" and cfg.family in ("bert", "roberta")


def rfa_normalisers(classifier: Classifier, params: dict, layer_inputs, mask) -> jnp.ndarray:
    """RFA's normaliser phi(q) . sum_k phi(k) per layer, token and head: [L, B, N, heads].

    `layer_inputs` [L(+1), B, N, H] holds each layer's input (`layer_states`); `mask` [B, N]
    marks real tokens (padded keys are left out of the sum, as in the forward)."""
    from secfwt_jax.models.attention import rfa_features

    cfg = classifier.config
    mask = jnp.asarray(mask, jnp.float32)
    shape = (*mask.shape, cfg.num_heads, cfg.head_dim)
    layers = params[classifier.trunk_name]["encoder"]["layer"]
    out = []
    for layer in range(cfg.num_layers):
        proj = layers[str(layer)]["attention"]["self"]
        hidden = layer_inputs[layer]
        q, k = ((hidden @ proj[n]["kernel"] + proj[n]["bias"]).reshape(shape) for n in ("query", "key"))  # fmt: skip
        phi_q, phi_k = rfa_features(q, k, mask, cfg.attention, layer)
        out.append(jnp.einsum("bnhf,bhf->bnh", phi_q, jnp.sum(phi_k, axis=1)))
    return jnp.stack(out)


def rfa_normaliser_floor(classifier: Classifier, params: dict, batch: dict) -> list[float]:
    """Per layer, the smallest |phi(q) . sum_k phi(k)| over real query tokens and heads.

    Trigonometric random features are not positive, so RFA's normaliser can approach zero;
    fixed-point errors of the features then become large relative errors of that token's
    output. Empty for softmax attention or a family without BERT-style q/k projections."""
    if not _has_normalisers(classifier):
        return []
    batch = _keys_for_trunk(batch)
    real = np.asarray(batch["attention_mask"], bool)
    states = layer_states(classifier, params, batch)
    den = np.abs(np.asarray(rfa_normalisers(classifier, params, states, batch["attention_mask"])))
    return [float(d[real].min()) for d in den]
