"""The functions the cost profiler measures: the SPSA step, the backprop step and each model
component, built at a model's real shapes with the step's real batching (see
:mod:`secfwt_jax.compile.profiler`, which profiles them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.traverse_util as traverse
import jax
import numpy as np

from secfwt_jax.models.classifier import Classifier, cross_entropy, cross_entropy_loss, trunk_module
from secfwt_jax.models.encoder import Embeddings, LayerNorm, SelfAttention, activation_fn
from secfwt_jax.models.heads import dense
from secfwt_jax.seeds import private_key
from secfwt_jax.tuning import backprop, sets, spsa, trainable


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The step being profiled: batch [B, N], K directions (population P = 2K), whether
    the word/position embeddings are trainable (the demo freezes them), and the direction
    distribution ("gaussian" or "rademacher", `tuning.spsa.SpsaConfig.directions`)."""

    batch_size: int
    seq_len: int
    num_directions: int = 1
    embeddings_trainable: bool = False
    eps: float = 1e-2
    learning_rate: float = 1e-3
    directions: str = "gaussian"

    def __post_init__(self) -> None:
        for f in ("batch_size", "seq_len", "num_directions"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f}: must be a positive int, got {getattr(self, f)!r}")

    @property
    def population(self) -> int:
        return 2 * self.num_directions


def _stack(tree, p: int):
    return jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (p, *np.shape(x))).copy(), tree)


def _normal(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def synthetic_batch(classifier: Classifier, shape: StepShape, seed: int = 0) -> dict:
    """One-hot ids [B, N, V], a right-padded mask [B, N] and one-hot labels [B, C]."""
    cfg, rng = classifier.config, np.random.default_rng([seed, 3])
    b, n = shape.batch_size, shape.seq_len
    ids = rng.integers(1, cfg.vocab_size, (b, n))
    mask = (np.arange(n)[None] < rng.integers(n // 2 + 1, n + 1, b)[:, None]).astype(np.float32)
    labels = rng.integers(0, classifier.head.num_labels, b)
    return {
        "input_ids": np.eye(cfg.vocab_size, dtype=np.float32)[ids] * mask[..., None],
        "attention_mask": mask,
        "labels": np.eye(classifier.head.num_labels, dtype=np.float32)[labels],
    }


def is_trainable(shape: StepShape) -> Callable[[str], bool]:
    return lambda path: shape.embeddings_trainable or "embeddings" not in path


def make_loss(classifier: Classifier):
    """The loss over a (trainable, frozen) split of the classifier's own tree."""
    return cross_entropy_loss(lambda t, f, b: classifier.logits(trainable.merge(t, f), b))


def spsa_update(
    theta, z, loss_pm, step_size, eps: float, weight_decay: float = 0.0, directions="gaussian"
):
    """The SPSA step's non-forward part, by the same functions as ``tuning.spsa.spsa_step``:
    the population theta +- eps z and the update. loss_pm: [2K] secret; step_size public."""
    k = jax.tree_util.tree_leaves(z)[0].shape[0]
    config = spsa.SpsaConfig(eps=eps, weight_decay=weight_decay, directions=directions)
    pair = spsa.perturbed_pair(theta, z, eps, directions)
    new, _ = spsa.spsa_update(theta, z, loss_pm[:k], loss_pm[k:], step_size, config)
    return pair, new


def _split_layer0(theta: dict) -> tuple[dict, dict]:
    """(trainable leaves of encoder layer 0, trainable leaves outside the layer stack)."""
    flat = traverse.flatten_dict(theta, sep="/")
    layer0 = {k: v for k, v in flat.items() if "/encoder/layer/0/" in k}
    rest = {k: v for k, v in flat.items() if "/encoder/layer/" not in k}
    return traverse.unflatten_dict(layer0, sep="/"), traverse.unflatten_dict(rest, sep="/")


def _update_case(theta: dict, shape: StepShape, seed: int, rng):
    z = spsa.directions(seed, 0, theta, shape.num_directions, shape.directions)
    fn = lambda t, zz, lpm, lr: spsa_update(t, zz, lpm, lr, shape.eps, 0.0, shape.directions)  # noqa: E731
    return (
        fn,
        (theta, z, _normal(rng, (shape.population,)), np.float32(shape.learning_rate)),
        (1, 3),
    )


def component_cases(classifier: Classifier, params: dict, shape: StepShape, seed: int):
    """name -> (fn, args, public indices). See module doc for the batching."""
    cfg, head = classifier.config, classifier.head
    if cfg.family not in ("bert", "roberta") or head.kind != "linear":
        raise ValueError("classifier: the component profiler supports bert/roberta + linear head")
    rng = np.random.default_rng([seed, 5])
    p, b, n, h = shape.population, shape.batch_size, shape.seq_len, cfg.hidden_size
    trunk = params[classifier.trunk_name]
    layer = trunk["encoder"]["layer"]["0"]
    batch = synthetic_batch(classifier, shape, seed)
    mask = batch["attention_mask"]
    x = _normal(rng, (p, b, n, h))
    vm = lambda f: jax.vmap(f, in_axes=(0, 0, None))  # noqa: E731 - weights, acts, mask

    def embeddings(pe, ids, m):
        return Embeddings(cfg).apply({"params": pe}, ids, m)[0]

    def attention(pa, xx, m):
        out = SelfAttention(cfg, 0).apply({"params": pa["self"]}, xx, m)
        return dense(out, pa["output"]["dense"])

    def ffn(pf, xx, _m):
        return dense(dense(xx, pf["intermediate"]), pf["output"])

    def layernorm(pl, xx, _m):
        return LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": pl}, xx)

    def gelu(xx):
        return activation_fn(cfg.activation, cfg.gelu_impl)(xx)

    def head_fn(ph, xx, m):
        return classifier.scores({classifier.head_name: ph}, xx, m, batch)

    def loss(logits, labels):
        return jax.vmap(cross_entropy, in_axes=(0, None))(logits, labels)

    theta_layer, theta_rest = _split_layer0(trainable.partition(params, is_trainable(shape))[0])
    emb_fn = vm(embeddings) if shape.embeddings_trainable else embeddings
    emb_p = _stack(trunk["embeddings"], p) if shape.embeddings_trainable else trunk["embeddings"]
    ffn_p = {"intermediate": layer["intermediate"]["dense"], "output": layer["output"]["dense"]}
    return {
        "embeddings": (emb_fn, (emb_p, batch["input_ids"], mask), ()),
        "attention": (vm(attention), (_stack(layer["attention"], p), x, mask), ()),
        "ffn": (vm(ffn), (_stack(ffn_p, p), x, mask), ()),
        "layernorm": (vm(layernorm), (_stack(layer["output"]["LayerNorm"], p), x, mask), ()),
        "gelu": (gelu, (_normal(rng, (p, b, n, cfg.intermediate_size)),), ()),
        "head": (vm(head_fn), (_stack(params[classifier.head_name], p), x, mask), ()),
        "loss": (loss, (_normal(rng, (p, b, head.num_labels)), batch["labels"]), ()),
        "update": _update_case(theta_layer, shape, seed, rng),
        "update_rest": _update_case(theta_rest, shape, seed, rng),
    }


def spsa_step_case(classifier: Classifier, params: dict, shape: StepShape, seed: int = 0):
    """(fn, args, public) of the whole SPSA step as the demo compiles it."""
    theta, frozen = trainable.partition(params, is_trainable(shape))
    loss_fn = make_loss(classifier)
    config = spsa.SpsaConfig(
        eps=shape.eps, num_directions=shape.num_directions, directions=shape.directions
    )

    def spsa_step(t, f, batch, z, lr):
        return spsa.spsa_step(loss_fn, t, f, batch, z, lr, config)

    z = spsa.directions(seed, 0, theta, shape.num_directions, shape.directions)
    args = (theta, frozen, synthetic_batch(classifier, shape, seed), z, np.float32(1e-3))
    return spsa_step, args, (3, 4)


def backprop_step_case(
    classifier: Classifier, params: dict, shape: StepShape, seed: int = 0, optimizer="sgd"
):
    """(fn, args, public) of the backprop (SFT) baseline: jax.grad + optax ``optimizer``
    ("sgd" or "adam"), same trainable set and loss. The optimiser state is created inside
    the step (its cost, e.g. Adam's sqrt and division, is counted; its carry-over is not).
    Everything but the (public) learning rate is secret."""
    theta, frozen = trainable.partition(params, is_trainable(shape))
    optimizer = backprop.make_optimizer(optimizer, shape.learning_rate)
    loss_fn = make_loss(classifier)

    def backprop_step(t, f, batch):
        new, _, info = backprop.backprop_step(loss_fn, optimizer, t, f, batch, optimizer.init(t))
        return new, info

    return backprop_step, (theta, frozen, synthetic_batch(classifier, shape, seed)), ()


# ------------------------------------------------------------------ bench rows (whole steps)

#: The paper's / BBT's prompt: 50 prompt tokens in a 500-dimensional random subspace.
PROMPT_LENGTH, INTRINSIC_DIM = 50, 500


def _unlabelled(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def forward_case(classifier: Classifier, params: dict, shape: StepShape, seed: int = 0):
    """(fn, args, public) of one forward: logits [B, C]; weights and data secret."""
    batch = _unlabelled(synthetic_batch(classifier, shape, seed))
    return (lambda p, b: classifier.logits(p, b)), (params, batch), ()


def forward_rest_case(classifier: Classifier, shape: StepShape, seed: int = 0):
    """(fn, args, public) of a forward without its trunk layers: the embedding, the final
    norm (Llama, GPT-2) and the head, as `Classifier.lower_hidden` and `upper_logits` run
    them around an empty slice. With `layer_case` it is a forward by parts: a forward of L
    layers costs rest + L x layer (`secfwt bench --by-parts`, for shapes whose whole
    program does not fit in memory). Only the parameters these parts read are inputs (a
    linear head reads no untied LM head)."""
    if classifier.head.kind != "linear":
        raise ValueError(f"head.kind: a forward by parts takes a linear head, not {classifier.head.kind!r}")  # fmt: skip
    clf = Classifier(dataclasses.replace(classifier.config, num_layers=1), classifier.head)
    batch = _unlabelled(synthetic_batch(clf, shape, seed))
    module, key = trunk_module(clf.config), private_key(seed, stream=13)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = np.zeros((*mask.shape, clf.config.hidden_size), np.float32)
    trunk = {
        **module.init(key, ids, mask, num_layers=0)["params"],
        **module.init(key, hidden, mask, embed=False, first_layer=1).get("params", {}),
    }
    params = {clf.trunk_name: jax.tree_util.tree_map(np.asarray, trunk), clf.head_name: clf.init_head(seed)}  # fmt: skip

    def forward_rest(p, b):
        return clf.upper_logits(p, *clf.lower_hidden(p, b, 0), b, first_layer=1)

    return forward_rest, (params, batch), ()


def layer_case(classifier: Classifier, shape: StepShape, seed: int = 0):
    """(fn, args, public) of one trunk layer on secret hidden states [B, N, H] with the
    forward's mask: a forward's per-layer part (see `forward_rest_case`). The layer is a
    slice that ends below the top, as the lower layers of a whole forward are; weights,
    hidden states and mask are secret, as in `forward_case`."""
    cfg = dataclasses.replace(classifier.config, num_layers=2)
    module = trunk_module(cfg)
    mask = synthetic_batch(classifier, shape, seed)["attention_mask"]
    hidden = _normal(np.random.default_rng([seed, 11]), (*mask.shape, cfg.hidden_size))
    kw = {"embed": False, "first_layer": 0, "num_layers": 1}
    params = module.init(private_key(seed, stream=13), hidden, mask, **kw)["params"]
    params = jax.tree_util.tree_map(np.asarray, params)

    def one_layer(p, h, m):
        return module.apply({"params": p}, h, m, **kw)[0]

    return one_layer, (params, hidden, mask), ()


def prompt_problem(classifier: Classifier, params: dict) -> sets.TuningProblem:
    spec = sets.TrainableSpec("prompt", prompt_length=PROMPT_LENGTH, intrinsic_dim=INTRINSIC_DIM)
    return sets.build_problem(spec, classifier, params, embed_std=0.02)


def prompt_backprop_case(
    classifier: Classifier, params: dict, shape: StepShape, seed: int = 0, optimizer="adam"
):
    """Gradient prompt tuning: jax.grad through the whole model to the prompt subspace z
    (`PROMPT_LENGTH` tokens), optax ``optimizer``; everything but the step size secret."""
    problem = prompt_problem(classifier, params)
    opt = backprop.make_optimizer(optimizer, shape.learning_rate)
    loss_fn = cross_entropy_loss(problem.logits)

    def prompt_backprop_step(t, f, batch):
        new, _, info = backprop.backprop_step(loss_fn, opt, t, f, batch, opt.init(t))
        return new, info

    args = (problem.trainable, problem.frozen, synthetic_batch(classifier, shape, seed))
    return prompt_backprop_step, args, ()


# ------------------------------------------------- goal (b): every trainable set's step
#: The trainable sets goal (b) covers (`tuning.sets.TrainableSpec.kind`), uncached.
SET_KINDS: tuple[str, ...] = ("full", "head", "bitfit", "lora", "prompt", "top")
