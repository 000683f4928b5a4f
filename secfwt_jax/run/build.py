"""The one builder: a `RunSpec` -> each owner's inputs and the run's programs.

Each function here runs where its data lives, so the same code serves the in-process
simulator and SecretFlow parties:

  model_owner_inputs(spec, head, private_seed)   at the model owner: its checkpoint (or an
      inline model from its private seed) -> trainable / frozen parameter trees + the
      public facts about them (architecture, shapes, the embedding std BBT's scaling needs)
  data_owner_inputs(spec, tokenizer)             at the data owner: its file -> k-shot
      train chunks and the evaluation subset, tokenised (one-hot ids, the MPC form)
  build_programs(spec, model_public, head)       anywhere, from public facts only: the pure
      functions that run under SPU (trunk, step, predict, population_loss) with their
      argument roles

Programs (all pure; `features` is a batch without labels; labels are one-hot [B, C]):

  trunk(frozen, inputs) -> features             the frozen lower layers, run once per chunk
                                                (only with `trainable.cache_trunk`)
  step(theta, frozen, features, labels, z, lr) -> (theta', loss)          one SPSA step
  predict(theta, frozen, features) -> one-hot predictions [B, C]          (argmax inside MPC)
  population_loss(population, frozen, features, labels) -> losses [P]     one CMA-ES generation

`plaintext_run` replays the same steps in the clear for the report's reference (it needs
both owners' secrets, so only an operator process that holds both may call it).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from secfwt_jax.data.batching import encode
from secfwt_jax.data.loaders import DataError, LabelledText, load_labelled
from secfwt_jax.data.sampling import k_shot_splits
from secfwt_jax.data.templates import PromptTemplate
from secfwt_jax.models import checkpoint
from secfwt_jax.models.classifier import Classifier, cross_entropy_loss
from secfwt_jax.models.config import AttentionConfig, ModelConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.run.program import ProgramDef
from secfwt_jax.run.spec import RunSpec, SpecError
from secfwt_jax.tuning import spsa
from secfwt_jax.tuning.sets import TuningProblem, build_problem, layer_index
from secfwt_jax.tuning.trainable import merge

Shapes = Any  # a tree of jax.ShapeDtypeStruct


# ---------------------------------------------------------------------- pytrees
def flatten(tree: dict) -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': array} (the .npz and share-file layout)."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def shapes_of(tree: Any) -> Any:
    """Public metadata of a private tree: the same structure with `ShapeDtypeStruct`
    leaves (shapes and dtypes, no values). Keys may hold '/' (LoRA's factor names)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)  # fmt: skip


def zeros_like_shapes(shapes: Any) -> Any:
    """A tree of zeros with the published shapes (what non-owners trace programs with)."""
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---------------------------------------------------------------------- the model owner
@dataclasses.dataclass(frozen=True)
class ModelPublic:
    """What the model owner publishes: architecture, tree shapes, BBT's embedding std."""

    model_config: dict
    trainable_shapes: Shapes
    frozen_shapes: Shapes
    embed_std: float

    def classifier(self, head: HeadConfig) -> Classifier:
        cfg = dict(self.model_config)
        cfg["attention"] = AttentionConfig(**cfg["attention"])
        return Classifier(ModelConfig(**cfg), head)


def head_config(spec: RunSpec, tokenizer) -> HeadConfig:
    """The head from the spec and the (public) tokenizer's verbalizer ids."""
    kind = spec.model.head.kind
    ids: tuple[int, ...] = ()
    if kind != "linear":
        template = PromptTemplate(spec.data.template or "{text}", spec.data.verbalizer or {})
        try:
            ids = template.verbalizer_ids(tokenizer, spec.data.labels)
        except DataError as error:
            raise SpecError(f"data.verbalizer: {error}") from None
    return HeadConfig(kind, len(spec.data.labels), spec.model.head.pooling, ids)


ADAPTATION_FILE = "secfwt_adaptation.json"  # written by `secfwt adapt`


def adaptation_record(directory) -> dict | None:
    """What `secfwt adapt` recorded for an adapted checkpoint (attention settings, GeLU,
    ...), or None for a checkpoint it did not write."""
    import json
    from pathlib import Path

    path = Path(directory) / ADAPTATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_adapted_attention(directory, attention: AttentionConfig, gelu: str = "piecewise") -> None:
    """Refuse an adapted checkpoint made for other random features or another GeLU (one
    line). Records written before `gelu` was recorded were made for "piecewise"."""
    record = adaptation_record(directory)
    if record is None:
        return
    made_for = record["attention"]
    wanted = dataclasses.asdict(attention)
    uses_exp = attention.kind == "softmax" or attention.variant == "softmax_kernel"
    # The same function (poly_degree: sin and cos within feature_maps.TRIG_TOLERANCE at
    # any degree; trig_schedule: the same products in another order), another MPC cost.
    numerics_only = {"inverse", "poly_degree", "trig_schedule"} | (set() if uses_exp else {"exp"})
    diff = sorted(k for k in made_for if made_for[k] != wanted.get(k) and k not in numerics_only)
    if diff:
        raise SpecError(f"model.attention: {directory} was adapted for other attention settings ({', '.join(diff)})")  # fmt: skip
    made_gelu = record.get("gelu", "piecewise")
    if made_gelu != gelu:
        raise SpecError(f"model.gelu: {directory} was adapted for gelu {made_gelu!r}, the spec says {gelu!r}")  # fmt: skip


def model_checkpoint_dir(spec: RunSpec, log: Callable[[str], None] = print):
    """The checkpoint the model owner loads: the adapted one when present, else the base."""
    adapted = spec.resolve(spec.model.adapted_checkpoint)
    if adapted is not None:
        if (adapted / "config.json").is_file():
            check_adapted_attention(adapted, spec.model.attention, spec.model.gelu)
            what = "attention" if spec.model.gelu in ("piecewise", "exact") else f"attention + {spec.model.gelu} GeLU"  # fmt: skip
            log(f"model owner: using the {what}-adapted checkpoint {adapted}")
            return adapted
        log(
            f"model owner: no adapted checkpoint at {adapted} (run `secfwt adapt` to make one); "
            "using the base checkpoint: RFA swapped into a softmax-trained model loses accuracy"
        )
    if spec.model.gelu in ("relu", "quad"):
        log(
            f"model owner: model.gelu {spec.model.gelu} on a checkpoint not adapted to it: "
            "expect a large accuracy loss (docs/cost.md, section 4)"
        )
    return spec.resolve(spec.model.checkpoint)


def load_model(
    spec: RunSpec, head: HeadConfig, private_seed: int, log: Callable[[str], None] = print
) -> tuple[Classifier, dict]:
    """At the model owner: (classifier, params) from its checkpoint or its private seed."""
    attention = spec.model.attention
    if spec.model.architecture is not None:
        arch = spec.model.architecture.model_dump()
        config = ModelConfig(**arch, attention=attention, gelu_impl=spec.model.gelu, silu_impl=spec.model.silu)  # fmt: skip
        classifier = Classifier(config, head)
        return classifier, classifier.init(private_seed)
    path = model_checkpoint_dir(spec, log)
    try:
        classifier, params = checkpoint.load_pretrained(
            path, attention, head, seed=private_seed, gelu_impl=spec.model.gelu,
            silu_impl=spec.model.silu,
        )  # fmt: skip
    except checkpoint.CheckpointError as error:
        raise SpecError(f"model.checkpoint: {error}") from None
    if spec.model.num_layers is not None:
        classifier, params = keep_first_layers(classifier, params, spec.model.num_layers)
    return classifier, params


def keep_first_layers(classifier: Classifier, params: dict, count: int) -> tuple[Classifier, dict]:  # fmt: skip
    """The checkpoint cut to its first `count` transformer layers (`model.num_layers`)."""
    config = classifier.config
    if count > config.num_layers:
        raise SpecError(f"model.num_layers: {count} is more than the checkpoint's {config.num_layers}")  # fmt: skip
    flat = traverse_util.flatten_dict(params[classifier.trunk_name], sep="/")
    # layer_index knows every family's layer-stack path (layer/<i>, h/<i>, layers/<i>)
    kept = {k: v for k, v in flat.items() if (layer_index(k) is None or layer_index(k) < count)}
    cut = Classifier(dataclasses.replace(config, num_layers=count), classifier.head)
    return cut, {**params, classifier.trunk_name: traverse_util.unflatten_dict(kept, sep="/")}


def model_owner_inputs(
    spec: RunSpec, head: HeadConfig, private_seed: int, log: Callable[[str], None] = print
) -> tuple[dict, dict, ModelPublic]:
    """At the model owner: (trainable, frozen, public facts)."""
    classifier, params = load_model(spec, head, private_seed, log)
    _check_positions(spec, classifier)
    problem = build_problem(spec.tuning.trainable, classifier, params, seed=private_seed)
    config = dataclasses.asdict(classifier.config)
    public = ModelPublic(
        model_config=config,
        trainable_shapes=shapes_of(problem.trainable),
        frozen_shapes=shapes_of(problem.frozen),
        embed_std=float(np.asarray(classifier.word_table(params)).std()),
    )
    as_np = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
    return as_np(problem.trainable), as_np(problem.frozen), public


def _check_positions(spec: RunSpec, classifier: Classifier) -> None:
    prompt = spec.tuning.trainable.prompt_length if spec.tuning.trainable.kind == "prompt" else 0
    if spec.data.max_len + prompt > classifier.config.max_positions:
        raise SpecError(
            f"data.max_len: {spec.data.max_len} (+ prompt {prompt}) exceeds the model's "
            f"max_positions {classifier.config.max_positions}"
        )


# ---------------------------------------------------------------------- the data owner
@dataclasses.dataclass(frozen=True)
class DataOwnerInputs:
    """The data owner's encoded examples; chunks are dicts of numpy arrays."""

    train_inputs: list[dict]  # features of each training chunk [B, N(, V)]
    train_labels: list[np.ndarray]  # one-hot [B, C]
    eval_inputs: list[dict]  # features of each evaluation chunk
    eval_labels: np.ndarray  # int [mpc_examples] (the real ones, padding excluded)
    test: LabelledText  # the plaintext test split (for the reference only)
    counts: dict[str, int]

    def public(self) -> dict[str, Any]:
        """Shapes and counts only (what the other parties need to trace and loop)."""
        return {
            "train_chunks": len(self.train_inputs),
            "eval_chunks": len(self.eval_inputs),
            "train_shapes": shapes_of(self.train_inputs[0]),
            "label_shape": tuple(self.train_labels[0].shape),
            "eval_shapes": shapes_of(self.eval_inputs[0]),
            "counts": dict(self.counts),
        }


def shared_input_elements(model: ModelPublic, data_public: dict[str, Any]) -> int:
    """How many elements the owners share into SPU in one run, from public facts: the
    trainable and frozen parameters, and every training chunk (inputs and labels) and
    evaluation chunk. Each crosses the SecretFlow links once, as shares."""

    def size(tree: Any) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))

    train = size(data_public["train_shapes"]) + int(np.prod(data_public["label_shape"]))
    data = data_public["train_chunks"] * train + data_public["eval_chunks"] * size(data_public["eval_shapes"])  # fmt: skip
    return size(model.trainable_shapes) + size(model.frozen_shapes) + data


def load_data(spec: RunSpec) -> LabelledText:
    """At the data owner: its labelled file (one-line DataError on bad input)."""
    d = spec.data
    return load_labelled(
        spec.resolve(d.path),
        text_column=d.text_column,
        label_column=d.label_column,
        labels=d.labels,
        keep_labels=d.labels,
        file_format=d.format,
    )


def _encode(spec: RunSpec, data: LabelledText, rows, tokenizer, vocab: int) -> dict:
    template = None
    if spec.data.template is not None:
        template = PromptTemplate(spec.data.template, spec.data.verbalizer or {})
    return encode(
        [data.texts[i] for i in rows],
        data.labels[rows],
        tokenizer,
        spec.data.max_len,
        template=template,
        head_kind=spec.model.head.kind,
        num_labels=len(spec.data.labels),
        one_hot_vocab=vocab,
    )


def _split_labels(batch: dict) -> tuple[dict, np.ndarray]:
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def mpc_eval_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` row indices of a test split for the evaluation under MPC: each class's rows in a
    seeded shuffle, interleaved class by class, so any prefix is balanced to within one
    row per class (until a class runs out). Never source order: a corpus sorted by label
    would otherwise give a single-class subset."""
    rng = np.random.default_rng([seed, 5])
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    depth = max(len(rows) for rows in per_class)
    interleaved = [rows[i] for i in range(depth) for rows in per_class if i < len(rows)]
    return np.asarray(interleaved[:n], dtype=np.int64)


def data_owner_inputs(spec: RunSpec, tokenizer, vocab_size: int) -> DataOwnerInputs:
    """At the data owner: k-shot sampling, chunking and tokenisation (module doc).

    The test split is stratified (`data.test_size // #labels` rows per class). Training
    chunks are `tuning.batch_size` rows in an order fixed by the public run seed; step i
    uses chunk i mod #chunks. The evaluation subset is `evaluation.mpc_examples` test rows
    balanced across classes (`mpc_eval_rows`), padded to whole chunks by repeating its
    first rows (their predictions are dropped).
    """
    data = load_data(spec)
    d, t, e = spec.data, spec.tuning, spec.evaluation
    try:
        splits = k_shot_splits(data, d.k, d.seed, dev_k=0, test_size=d.test_size, stratify_test=True)  # fmt: skip
    except DataError as error:
        raise SpecError(f"data.k: {error}") from None
    n_train = len(splits.train)
    if t.batch_size > n_train:
        raise SpecError(f"tuning.batch_size: {t.batch_size} exceeds the {n_train} training examples (k={d.k} x {len(d.labels)} labels)")  # fmt: skip
    if e.mpc_examples > len(splits.test):
        raise SpecError(f"evaluation.mpc_examples: {e.mpc_examples} exceeds data.test_size {len(splits.test)}")  # fmt: skip
    order = np.random.default_rng([spec.seed, 3]).permutation(n_train)
    train_inputs, train_labels = [], []
    for start in range(0, n_train - n_train % t.batch_size, t.batch_size):
        rows = order[start : start + t.batch_size]
        inputs, labels = _split_labels(_encode(spec, splits.train, rows, tokenizer, vocab_size))
        train_inputs.append(inputs)
        train_labels.append(labels)
    n_eval = e.mpc_examples
    chosen = mpc_eval_rows(splits.test.labels, n_eval, d.seed)
    padded = -(-n_eval // e.batch_size) * e.batch_size
    eval_rows = np.concatenate([chosen, chosen[np.arange(padded - n_eval) % n_eval]])
    eval_inputs = []
    for start in range(0, padded, e.batch_size):
        rows = eval_rows[start : start + e.batch_size]
        eval_inputs.append(_split_labels(_encode(spec, splits.test, rows, tokenizer, vocab_size))[0])  # fmt: skip
    counts = {"train": n_train, "test": len(splits.test), "mpc_eval": n_eval, "max_len": d.max_len}
    return DataOwnerInputs(
        train_inputs,
        train_labels,
        eval_inputs,
        splits.test.labels[chosen].copy(),
        splits.test,
        counts,
    )


def probe_inputs(spec: RunSpec, tokenizer, vocab_size: int) -> dict:
    """A public probe chunk for the model owner's range check (`run.ranges`): texts of
    random tokens of the public tokenizer, encoded as the data owner encodes a chunk."""
    n = spec.tuning.batch_size
    rng = np.random.default_rng([spec.seed, 11])
    ids = rng.integers(0, min(vocab_size, len(tokenizer)), (n, spec.data.max_len))
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) or "x" for row in ids]
    probe = LabelledText(texts, np.arange(n) % len(spec.data.labels), spec.data.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of the probe's texts is expected
        return _split_labels(_encode(spec, probe, np.arange(n), tokenizer, vocab_size))[0]


#: How far below the fixed-point product bound a probe's largest product must stay: real
#: text differs from the probe, and SPU's nonlinear approximations need headroom.
RANGE_MARGIN = 16


def check_product_range(spec: RunSpec, programs: RunPrograms, theta, frozen, tokenizer, vocab_size: int, ring_bits: int, f: int) -> None:  # fmt: skip
    """At the model owner, before it shares anything: the run's forward (the cached trunk,
    then the predict program) in plaintext on `probe_inputs`; refuse in one line naming
    a weight tensor if a product past 1/`RANGE_MARGIN` of the bound of a `ring_bits` ring
    with `f` fraction bits reaches the outputs (`run.ranges.find_overflow`)."""
    from secfwt_jax.run.ranges import find_overflow, product_bound

    bound = product_bound(ring_bits, f)
    limit = bound / RANGE_MARGIN
    lower, upper = programs.frozen_parts(frozen)
    x = probe_inputs(spec, tokenizer, vocab_size)
    found = None
    if programs.trunk is not None:
        found = find_overflow(programs.trunk.fn, (lower, x), ("frozen", None), limit)
        x = jax.tree_util.tree_map(np.asarray, programs.trunk.fn(lower, x))
    if found is None:
        found = find_overflow(programs.predict.fn, (theta, upper, x), ("trainable", "frozen", None), limit)  # fmt: skip
    if found is not None:
        raise ValueError(
            f"{found.source or 'the model'}: the model owner's weights make a product reach "
            f"{found.peak:.3g} on a probe of ordinary text, past {limit:.3g} (1/{RANGE_MARGIN} "
            f"of {bound:.3g}, the most one product holds in a {ring_bits}-bit ring with {f} "
            "fraction bits), and it reaches the outputs: SPU would compute garbage silently. "
            "Scale these weights down or use protocol.field FM128"
        )


def public_data_shapes(spec: RunSpec, tokenizer, vocab_size: int) -> dict[str, Any]:
    """What the data owner publishes, derived from the spec and the public tokenizer alone
    (no data file): chunk shapes for compiling ahead of a run (`secfwt compile`)."""
    n = max(spec.tuning.batch_size, spec.evaluation.batch_size)
    dummy = LabelledText(["x"] * n, np.zeros(n, np.int64), spec.data.labels)

    def chunk_shapes(rows: int) -> tuple[dict, tuple]:
        # token ids, then their one-hot shape: only the vocabulary's size matters, so a
        # model smaller than the tokenizer (a cost study's) still gets its shapes
        chunk, labels = _split_labels(_encode(spec, dummy, np.arange(rows), tokenizer, None))
        shapes = shapes_of(chunk)
        ids = shapes["input_ids"].shape
        shapes["input_ids"] = jax.ShapeDtypeStruct((*ids, vocab_size), np.float32)
        return shapes, tuple(labels.shape)

    train, label_shape = chunk_shapes(spec.tuning.batch_size)
    evals, _ = chunk_shapes(spec.evaluation.batch_size)
    return {
        "train_shapes": train,
        "label_shape": label_shape,
        "eval_shapes": evals,
        "train_chunks": spec.data.k * len(spec.data.labels) // spec.tuning.batch_size,
        "eval_chunks": -(-spec.evaluation.mpc_examples // spec.evaluation.batch_size),
    }


# ---------------------------------------------------------------------- programs
def _batch_role(path: str) -> str:
    return "data"


_EMBEDDINGS = ("embeddings", "wte", "wpe", "embed_tokens")
_WORD_TABLES = ("embeddings/word_embeddings/", "/wte/", "/embed_tokens/")


def split_frozen(frozen: Any, first: int, verbalizer_head: bool) -> tuple[Any, Any]:
    """(lower, upper): the frozen leaves the cached trunk reads (embeddings and layers below
    `first`) and those the per-step programs read (the rest; plus the word table, which a
    verbalizer head scores with). Each program then takes only what it reads: an unread
    input still costs a copy of its shares on every run. Works on arrays and shape trees."""
    flat = traverse_util.flatten_dict(frozen, sep="/")

    def is_embedding(path: str) -> bool:
        return any(part in _EMBEDDINGS for part in path.split("/"))

    def lower(path: str) -> bool:
        index = layer_index(path)
        return (index is not None and index < first) or is_embedding(path)

    def upper(path: str) -> bool:
        index = layer_index(path)
        if index is not None:
            return index >= first
        if is_embedding(path):
            return verbalizer_head and any(t in path for t in _WORD_TABLES)
        return True

    def pick(keep) -> Any:
        return traverse_util.unflatten_dict({k: v for k, v in flat.items() if keep(k)}, sep="/")

    upper_part = pick(upper)
    for top in frozen:  # keep every section (the trunk's may be empty for a head-only set)
        upper_part.setdefault(top, {})
    return pick(lower), upper_part


def known_constants(spec: RunSpec, classifier: Classifier, embed_std: float) -> dict:
    """Public arrays the programs close over, by label: the RFA directions of each layer and
    the prompt projection A (the artifact metadata names them among the hoisted constants)."""
    from secfwt_jax.models.feature_maps import random_directions
    from secfwt_jax.tuning.sets import prompt_projection

    c, known = classifier.config, {}
    if c.attention.kind == "rfa":
        a = c.attention
        for layer in range(c.num_layers):
            w = random_directions(a.seed, layer, c.num_heads, c.head_dim, a.num_features, a.sigma)
            known[f"attention/layer/{layer}/directions"] = ("features", w)
    if spec.tuning.trainable.kind == "prompt":
        projection = prompt_projection(spec.tuning.trainable, c.hidden_size, embed_std)
        known["prompt/projection"] = ("projection", projection)
    return known


@dataclasses.dataclass(frozen=True)
class RunPrograms:
    """The run's SPU programs; `trunk` is None unless the lower trunk is cached."""

    problem: TuningProblem
    step: ProgramDef
    predict: ProgramDef
    population_loss: ProgramDef
    trunk: ProgramDef | None
    trunk_eval: ProgramDef | None  # the trunk at the evaluation chunk's shape, if it differs
    first_layer: int

    verbalizer_head: bool = False
    privacy: Any = None  # the public `run.privacy.PrivacyPlan` of a private run

    def frozen_parts(self, frozen: Any) -> tuple[Any, Any]:
        """(what the trunk programs read, what the other programs read) of `frozen`; without
        a cached trunk, (None, frozen)."""
        if self.trunk is None:
            return None, frozen
        return split_frozen(frozen, self.first_layer, self.verbalizer_head)

    def needed(self, method: str) -> list[ProgramDef]:
        """The programs a run of `method` ("spsa" | "cma") executes, in order of use."""
        tuning = self.step if method == "spsa" else self.population_loss
        return [p for p in (self.trunk, self.trunk_eval, self.predict, tuning) if p is not None]


def _like_problem(spec: RunSpec, public: ModelPublic, head: HeadConfig) -> TuningProblem:
    """The tuning problem rebuilt from public facts: zero parameters of the right shapes
    (the closures it makes read only public constants: scales, projections, features)."""
    classifier = public.classifier(head)
    spec_t = spec.tuning.trainable
    # The model's own parameters: frozen plus trainable, minus the added trainables
    # (LoRA factors, the prompt's z), which build_problem creates itself.
    model_part = {k: v for k, v in public.trainable_shapes.items() if k not in ("lora", "z")}
    like = zeros_like_shapes(merge(model_part, public.frozen_shapes))
    problem = build_problem(spec_t, classifier, like, seed=0, embed_std=public.embed_std)
    return dataclasses.replace(
        problem,
        trainable=zeros_like_shapes(public.trainable_shapes),
        frozen=zeros_like_shapes(public.frozen_shapes),
    )


def _first_layer(spec: RunSpec, classifier: Classifier) -> int:
    t = spec.tuning.trainable
    layers = classifier.config.num_layers
    return layers if t.kind == "head" else layers - min(t.top_layers, layers)


def _abstract_features(spec, classifier, data_public: dict, first: int, key: str) -> dict:
    """Zero features of a chunk: the raw inputs, or the cached trunk's hidden states."""
    inputs = zeros_like_shapes(data_public[key])
    if not spec.tuning.trainable.cache_trunk:
        return inputs
    b, n = inputs["attention_mask"].shape
    feats = {
        "hidden": np.zeros((b, n, classifier.config.hidden_size), np.float32),
        "attention_mask": np.zeros((b, n), np.float32),
    }
    if "select" in inputs:
        feats["select"] = inputs["select"]
    return feats


def build_programs(
    spec: RunSpec, public: ModelPublic, head: HeadConfig, data_public: dict
) -> RunPrograms:
    """The run's programs from public facts only (every party builds the same ones)."""
    problem = _like_problem(spec, public, head)
    classifier = public.classifier(head)
    first = _first_layer(spec, classifier)
    cfg = spec.tuning.spsa
    theta, frozen = problem.trainable, problem.frozen
    verbalizer = head.kind != "linear"
    frozen_lower, frozen = (
        split_frozen(frozen, first, verbalizer) if spec.tuning.trainable.cache_trunk else (None, frozen)
    )  # fmt: skip
    feats = _abstract_features(spec, classifier, data_public, first, "train_shapes")
    eval_feats = _abstract_features(spec, classifier, data_public, first, "eval_shapes")
    labels = np.zeros(data_public["label_shape"], np.float32)
    num_labels = head.num_labels
    # What fixes the programs besides input shapes (and so the cache key): not the steps,
    # the data file or the parties, so a longer run reuses the compiled programs.
    desc = {
        "model": public.model_config,
        "head": dataclasses.asdict(head),
        "trainable": dataclasses.asdict(spec.tuning.trainable),
        "spsa": dataclasses.asdict(cfg),
        "embed_std": public.embed_std if spec.tuning.trainable.kind == "prompt" else None,
    }
    known = known_constants(spec, classifier, public.embed_std)

    def make(*fields) -> ProgramDef:
        return ProgramDef(*fields, description=desc, known_constants=known)

    loss_fn = cross_entropy_loss(problem.logits)

    def step(t, f, x, y, z, lr):
        # Only the new (secret) parameters and the batch loss leave the step.
        new_t, info = spsa.spsa_step(loss_fn, t, f, {**x, "labels": y}, z, lr, cfg)
        return new_t, info["loss"]

    def predict(t, f, x):
        return jax.nn.one_hot(jnp.argmax(problem.logits(t, f, x), axis=-1), num_labels)

    def population_loss(pop, f, x, y):
        return spsa.evaluate_population(loss_fn, pop, f, {**x, "labels": y})

    z = jax.tree_util.tree_map(
        lambda a: np.zeros((cfg.num_directions, *a.shape), np.float32), theta
    )
    pop = jax.tree_util.tree_map(
        lambda a: np.zeros((spec.tuning.cma.population, *a.shape), np.float32), theta
    )
    lr = np.float32(0)
    trunk = trunk_eval = None
    if spec.tuning.trainable.cache_trunk:

        def trunk_fn(f, inputs):
            hidden, mask = classifier.lower_hidden(f, inputs, first)
            out = {"hidden": hidden, "attention_mask": mask}
            if "select" in inputs:
                out["select"] = inputs["select"]
            return out

        def trunk_program(name: str, key: str) -> ProgramDef:
            inputs = zeros_like_shapes(data_public[key])
            return make(name, trunk_fn, (frozen_lower, inputs), ("frozen", "inputs"), ("weights", _batch_role))  # fmt: skip

        trunk = trunk_program("trunk", "train_shapes")
        if data_public["eval_shapes"] != data_public["train_shapes"]:
            trunk_eval = trunk_program("trunk_eval", "eval_shapes")
    plan, step_program = None, make(
        "spsa_step",
        step,
        (theta, frozen, feats, labels, z, lr),
        ("trainable", "frozen", "features", "labels", "z", "step_size"),
        ("trainable", "weights", _batch_role, "labels", "directions", "step_size"),
    )  # fmt: skip
    if spec.tuning.privacy is not None:
        plan, step_program = _private_step(spec, problem, make, (theta, frozen, feats, labels, z, lr), data_public)  # fmt: skip
    return RunPrograms(
        problem=problem,
        step=step_program,
        predict=make(
            "predict",
            predict,
            (theta, frozen, eval_feats),
            ("trainable", "frozen", "features"),
            ("trainable", "weights", _batch_role),
        ),  # fmt: skip
        population_loss=make(
            "population_loss",
            population_loss,
            (pop, frozen, feats, labels),
            ("population", "frozen", "features", "labels"),
            ("directions", "weights", _batch_role, "labels"),
        ),  # fmt: skip
        trunk=trunk,
        trunk_eval=trunk_eval,
        first_layer=first,
        verbalizer_head=verbalizer,
        privacy=plan,
    )


def _private_step(spec, problem, make, example, data_public):
    """The private run's plan and its step program (`run.privacy`): every training chunk's
    features and labels go in, and the data owner's sample, inclusion marks and noise."""
    from secfwt_jax.run import privacy as private_run

    theta, frozen, feats, labels, z, lr = example
    chunks = data_public["train_chunks"]
    plan = private_run.privacy_plan(spec, chunks * labels.shape[0])
    r = plan.max_rows
    program = make(
        "dp_spsa_step",
        private_run.private_step_fn(problem, spec.tuning.spsa, plan, chunks),
        (theta, frozen, *(feats,) * chunks, *(labels,) * chunks, np.zeros((r, plan.num_rows), np.float32),
         np.zeros(r, np.float32), z, np.zeros(plan.directions, np.float32), lr),
        ("trainable", "frozen", *(f"features{i}" for i in range(chunks)), *(f"labels{i}" for i in range(chunks)),
         "pick", "included", "z", "noise", "step_size"),
        ("trainable", "weights", *(_batch_role,) * chunks, *("labels",) * chunks, "data", "data", "directions", "data", "step_size"),
    )  # fmt: skip
    return plan, program


# ---------------------------------------------------------------------- public per-step values
def step_directions(spec: RunSpec, step: int, theta_like: dict) -> dict:
    """Public directions z of step `step`, regenerated from the public run seed."""
    cfg = spec.tuning.spsa
    return spsa.directions(spec.seed, step, theta_like, cfg.num_directions, kind=cfg.directions)


def accuracy(predictions_onehot: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose predicted class equals the int label (first len(labels) rows)."""
    pred = np.argmax(np.asarray(predictions_onehot)[: len(labels)], axis=-1)
    return float(np.mean(pred == labels))


__all__ = [
    "DataOwnerInputs",
    "ModelPublic",
    "ProgramDef",
    "RunPrograms",
    "accuracy",
    "build_programs",
    "data_owner_inputs",
    "flatten",
    "head_config",
    "load_data",
    "load_model",
    "model_owner_inputs",
    "shapes_of",
    "step_directions",
    "zeros_like_shapes",
]
