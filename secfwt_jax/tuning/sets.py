"""Trainable sets: which parameters a forward-only (or backprop) step moves.

    spec = TrainableSpec(kind="lora", lora_rank=4)
    problem = build_problem(spec, classifier, params, seed=0)
    logits = problem.logits(problem.trainable, problem.frozen, batch)

Kinds:
  head    the task head only (a linear head; for verbalizer heads, the MLM transform);
  bitfit  every bias plus the head (Ben Zaken et al. 2022);
  lora    rank-r factors A [in, r], B [r, out] on the attention projections, scaled by
          alpha / r; B starts at zero so tuning starts from the pretrained model; plus a
          linear head when there is one. Every layer gets factors, except with
          `cache_trunk=True`: then only the top `top_layers` layers do (0: none, the head
          alone trains), the frozen lower layers run once per example (`prepare`, as for
          `top`) and each step re-runs the top layers with their factors and the head. The
          whole trunk stays frozen (and secret under MPC); only factors and head train;
  prompt  a soft prompt in a random subspace, p = A z (BBT, SecFwT): z [d] is trained,
          A [P*H, d] is fixed from a public seed and scaled like BBT by the word embeddings'
          std; the linear head, if any, stays frozen (fit it first, e.g. a linear probe).
          It enters at the input, or with `cache_trunk=True` as a deep prompt at the
          first of the top `top_layers` layers (BBTv2's per-layer prompts cut to that
          layer): the lower layers run once per example and a candidate re-runs only the
          top layers. A decoder's prompt goes before the tokens, an encoder's after [CLS];
  top     the top `top_layers` trunk layers plus the head. With `cache_trunk=True` the
          frozen lower layers run ONCE per example (`problem.prepare(batch)`) and every step
          re-runs only the top layers and head. Under MPC the cached activations stay
          secret shares; each of the 2K perturbed forwards then costs (top_layers / L) of
          the trunk instead of all of it (plus the head and loss).
  full    every parameter.

`frozen` is always a separate pytree: under MPC it is the model owner's secret and is never
perturbed. The public random matrix A is a trace-time constant, so p = A z is a
public-by-secret product: local under MPC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import flax.traverse_util as traverse
import jax.numpy as jnp
import numpy as np

from secfwt_jax.models.classifier import Classifier
from secfwt_jax.tuning import trainable as tr

SetKind = Literal["head", "bitfit", "lora", "prompt", "top", "full"]
LORA_TARGETS = {
    "bert": ("attention/self/query", "attention/self/value"),
    "roberta": ("attention/self/query", "attention/self/value"),
    "gpt2": ("attn/c_attn",),
    "llama": ("self_attn/q_proj", "self_attn/v_proj"),  # as MeZO's and PEFT's defaults
}


@dataclasses.dataclass(frozen=True)
class TrainableSpec:
    kind: SetKind = "head"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    prompt_length: int = 10
    intrinsic_dim: int = 500
    projection_seed: int = 1234
    top_layers: int = 1
    cache_trunk: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("head", "bitfit", "lora", "prompt", "top", "full"):
            raise ValueError(f"trainable.kind: unknown {self.kind!r}")
        if self.lora_rank < 1:
            raise ValueError("trainable.lora_rank: must be >= 1")
        if self.prompt_length < 1:
            raise ValueError("trainable.prompt_length: must be >= 1")
        if self.intrinsic_dim < 1:
            raise ValueError("trainable.intrinsic_dim: must be >= 1")
        if self.top_layers < 0:
            raise ValueError("trainable.top_layers: must be >= 0")
        if self.cache_trunk and self.kind not in ("head", "top", "lora", "prompt"):
            raise ValueError("trainable.cache_trunk: only for kind 'head', 'top', 'lora' or 'prompt'")  # fmt: skip
        if self.cache_trunk and self.kind == "prompt" and self.top_layers < 1:
            raise ValueError("trainable.top_layers: a cached-trunk prompt enters below the top layers, so at least 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TuningProblem:
    """trainable / frozen pytrees and `logits(trainable, frozen, batch) -> [B, C]`.

    `prepare(batch)` must be applied once to every batch before `logits` (identity except
    with frozen-trunk caching, where it runs the frozen lower layers).
    """

    spec: TrainableSpec
    trainable: dict
    frozen: dict
    logits: Callable
    prepare: Callable = lambda batch: batch


def lora_paths(params: dict, classifier: Classifier, first_layer: int = 0) -> list[str]:
    """The kernels LoRA adapts (attention projections) in trunk layers >= `first_layer`."""
    flat = traverse.flatten_dict(params, sep="/")
    targets = LORA_TARGETS[classifier.config.family]

    def adapted(k: str) -> bool:
        index = layer_index(k)
        return index is None or index >= first_layer

    return sorted(
        k[: -len("/kernel")]
        for k in flat
        if k.endswith("/kernel") and any(t in k for t in targets) and adapted(k)
    )


def lora_first_layer(spec: TrainableSpec, classifier: Classifier) -> int:
    """The lowest layer with LoRA factors: 0, or with a cached trunk L - top_layers."""
    if not spec.cache_trunk:
        return 0
    layers = classifier.config.num_layers
    return layers - min(spec.top_layers, layers)


def init_lora(params: dict, classifier: Classifier, spec: TrainableSpec, seed: int) -> dict:
    """{'/'-joined kernel path: {'a': [in, r], 'b': [r, out]}}; a ~ N(0, 1/in), b = 0."""
    flat = traverse.flatten_dict(params, sep="/")
    rng = np.random.default_rng([seed, 11])
    factors = {}
    for path in lora_paths(params, classifier, lora_first_layer(spec, classifier)):
        kernel = flat[path + "/kernel"]
        fan_in, fan_out = kernel.shape
        factors[path] = {
            "a": (rng.standard_normal((fan_in, spec.lora_rank)) / np.sqrt(fan_in)).astype(
                np.float32
            ),
            "b": np.zeros((spec.lora_rank, fan_out), np.float32),
        }
    return factors


def apply_lora(params: dict, factors: dict, scale: float) -> dict:
    """params with kernel += scale * a @ b at every LoRA path."""
    flat = traverse.flatten_dict(params, sep="/")
    for path, ab in factors.items():
        flat[path + "/kernel"] = flat[path + "/kernel"] + scale * (ab["a"] @ ab["b"])
    return traverse.unflatten_dict(flat, sep="/")


def prompt_projection(spec: TrainableSpec, hidden: int, embed_std: float) -> np.ndarray:
    """Public A [P*H, d] ~ N(0, sigma^2), sigma = embed_std / sqrt(d) (BBT's scaling)."""
    rng = np.random.default_rng([spec.projection_seed, spec.intrinsic_dim])
    sigma = embed_std / np.sqrt(spec.intrinsic_dim)
    shape = (spec.prompt_length * hidden, spec.intrinsic_dim)
    return (rng.standard_normal(shape) * sigma).astype(np.float32)


def subspace_prompt(z, projection: np.ndarray, prompt_length: int):
    """p = A z reshaped to [1, P, H]."""
    return (jnp.asarray(projection) @ z).reshape(1, prompt_length, -1)


def _split_problem(spec, classifier, params, predicate) -> TuningProblem:
    trainable, frozen = tr.partition(params, predicate)
    return TuningProblem(
        spec, trainable, frozen, lambda t, f, b: classifier.logits(tr.merge(t, f), b)
    )


def _cached_trunk(classifier: Classifier, params: dict, first: int) -> Callable:
    """`prepare`: the frozen layers below `first`, run once per batch (their output is
    what every step reads as `batch["hidden"]`)."""

    def prepare(batch):
        hidden, mask = classifier.lower_hidden(params, batch, first)
        return {**batch, "hidden": hidden, "attention_mask": mask}

    return prepare


def layer_index(path: str) -> int | None:
    """Trunk layer of a parameter path (`.../layer/<i>/...`, `.../h/<i>/...` or a Llama's
    `.../layers/<i>/...`), else None."""
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "h", "layers") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _top_problem(spec: TrainableSpec, classifier: Classifier, params: dict) -> TuningProblem:
    num_layers = classifier.config.num_layers
    first = num_layers - min(spec.top_layers, num_layers)
    head = classifier.head_name

    def is_trainable(path: str) -> bool:
        index = layer_index(path)
        return path.split("/")[0] == head or (index is not None and index >= first)

    if not spec.cache_trunk:
        return _split_problem(spec, classifier, params, is_trainable)
    trainable, frozen = tr.partition(params, is_trainable)
    prepare = _cached_trunk(classifier, params, first)

    def cached_logits(t, f, b):
        merged = tr.merge(t, f)
        return classifier.upper_logits(merged, b["hidden"], b["attention_mask"], b, first)

    return TuningProblem(spec, trainable, frozen, cached_logits, prepare)


def _lora_problem(
    spec: TrainableSpec, classifier: Classifier, params: dict, seed: int
) -> TuningProblem:
    head = classifier.head_name
    has_head = head in params
    head_params, frozen = tr.partition(params, tr.head_only(head)) if has_head else ({}, params)
    trainable = {"lora": init_lora(params, classifier, spec, seed), **head_params}
    scale = spec.lora_alpha / spec.lora_rank

    def adapted(t, f):
        merged = tr.merge({k: v for k, v in t.items() if k != "lora"}, f)
        return apply_lora(merged, t["lora"], scale)

    if not spec.cache_trunk:
        return TuningProblem(
            spec, trainable, frozen, lambda t, f, b: classifier.logits(adapted(t, f), b)
        )
    first = lora_first_layer(spec, classifier)
    prepare = _cached_trunk(classifier, params, first)

    def cached_logits(t, f, b):
        return classifier.upper_logits(adapted(t, f), b["hidden"], b["attention_mask"], b, first)

    return TuningProblem(spec, trainable, frozen, cached_logits, prepare)


def build_problem(
    spec: TrainableSpec,
    classifier: Classifier,
    params: dict,
    seed: int = 0,
    embed_std: float | None = None,
) -> TuningProblem:
    """Split `params` for `spec` and return the matching logits function.

    `embed_std` overrides the word embeddings' std that scales the prompt projection (a
    party that holds only zero parameters of the right shapes passes the published one).
    """
    head = classifier.head_name
    if spec.kind == "top" or (spec.kind == "head" and spec.cache_trunk):
        top = spec if spec.kind == "top" else dataclasses.replace(spec, top_layers=0)
        return _top_problem(top, classifier, params)
    if spec.kind == "full":
        return _split_problem(spec, classifier, params, tr.everything)
    if spec.kind == "head":
        return _split_problem(spec, classifier, params, tr.head_only(head))
    if spec.kind == "bitfit":
        return _split_problem(spec, classifier, params, tr.biases_only(head))
    if spec.kind == "lora":
        return _lora_problem(spec, classifier, params, seed)
    # prompt
    if embed_std is None:
        embed_std = float(np.asarray(classifier.word_table(params)).std())
    projection = prompt_projection(spec, classifier.config.hidden_size, embed_std)
    trainable = {"z": np.zeros(spec.intrinsic_dim, np.float32)}

    def prompt_logits(t, f, b):
        prompt = subspace_prompt(t["z"], projection, spec.prompt_length)
        return classifier.logits(f, b, prompt=prompt)

    if not spec.cache_trunk:
        return TuningProblem(spec, trainable, params, prompt_logits)
    # A deep prompt: p = A z enters at the first uncached layer (BBTv2's per-layer prompts,
    # cut to that one layer), so a candidate re-runs the top layers, not the whole model.
    first = classifier.config.num_layers - min(spec.top_layers, classifier.config.num_layers)

    def deep_prompt_logits(t, f, b):
        prompt = subspace_prompt(t["z"], projection, spec.prompt_length)
        return classifier.upper_logits(f, b["hidden"], b["attention_mask"], b, first, prompt)

    return TuningProblem(
        spec, trainable, params, deep_prompt_logits, _cached_trunk(classifier, params, first)
    )
