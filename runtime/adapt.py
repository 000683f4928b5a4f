"""`secfwt adapt`: the model owner's attention adaptation, in plaintext, on public text.

    secfwt adapt --checkpoint bundled:minilm --text public.csv --out adapted/minilm-rfa

It distils the RFA model towards the checkpoint's own softmax model
(`secfwt_jax.tuning.adaptation`) and writes an ordinary Hugging Face checkpoint directory
(config, Flax weights, tokenizer files) plus `secfwt_adaptation.json`, which records the
attention settings the weights were adapted for: the random features are fixed by them,
so a run spec must use the same ones (`build.model_checkpoint_dir` checks). Only public,
unlabelled text is read; no data owner is involved.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from secfwt_jax.models.config import AttentionConfig
from secfwt_jax.run.build import ADAPTATION_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "merges.txt", "special_tokens_map.json")  # fmt: skip


def _public_texts(path: Path, column: str, rows: int) -> list[str]:
    from secfwt_jax.data.loaders import load_labelled

    data = load_labelled(path, text_column=column, label_column=column)
    return data.texts[:rows]


def adapt_checkpoint(
    checkpoint: Path,
    texts: list[str],
    out: Path,
    attention: AttentionConfig,
    *,
    steps: int = 600,
    learning_rate: float = 2e-4,
    batch_size: int = 16,
    max_len: int = 32,
    gelu_impl: str = "piecewise",
    normaliser_margin: float | None = None,
    normaliser_weight: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Distil, then write the adapted checkpoint to `out` (temp dir, then rename).

    The teacher is the checkpoint as trained (softmax, exact GeLU); the student has
    `attention` and `gelu_impl`. With a GeLU stand-in every transformer layer moves
    (`adaptation.default_param_set`), else only the attention blocks. The loss keeps RFA's
    normalisers above `normaliser_margin` (default `adaptation.NORMALISER_MARGIN`, weight
    `adaptation.NORMALISER_WEIGHT`; weight 0 turns it off)."""
    import optax
    from tqdm.auto import tqdm
    from transformers import AutoConfig, FlaxAutoModel

    from secfwt_jax.data.batching import encode
    from secfwt_jax.models.checkpoint import load_pretrained, load_tokenizer
    from secfwt_jax.models.heads import HeadConfig
    from secfwt_jax.tuning import adaptation, loop

    if steps < 1:
        raise ValueError("--steps: must be >= 1")
    margin = adaptation.NORMALISER_MARGIN if normaliser_margin is None else normaliser_margin
    weight = adaptation.NORMALISER_WEIGHT if normaliser_weight is None else normaliser_weight
    if not margin > 0:
        raise ValueError(f"--normaliser-margin: must be positive, got {margin}")
    if weight < 0:
        raise ValueError(f"--normaliser-weight: must be >= 0, got {weight}")
    if len(texts) < batch_size + 8:
        raise ValueError(f"--text: {len(texts)} rows is too few for batch {batch_size}")
    head = HeadConfig(num_labels=2)
    teacher, params = load_pretrained(
        checkpoint, AttentionConfig(kind="softmax"), head, gelu_impl="exact"
    )
    student, _ = load_pretrained(checkpoint, attention, head, gelu_impl=gelu_impl)
    param_set = adaptation.default_param_set(gelu_impl)
    tokenizer = load_tokenizer(checkpoint)
    corpus = encode(texts, None, tokenizer, max_len)
    held_out = {k: v[-8:] for k, v in corpus.items()}
    corpus = {k: v[:-8] for k, v in corpus.items()}
    before = adaptation.distillation_distance(student, params, teacher, params, held_out)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps, 0.0)  # fmt: skip
    what = "attention" if param_set == "attention" else f"attention + {gelu_impl} GeLU"
    bar = tqdm(total=steps, desc=f"{what} adaptation (plaintext)", unit="step")

    def batches(step: int) -> dict:
        bar.update(1)
        return stream(step)

    stream = loop.cycle_minibatches(corpus, batch_size, seed=0)
    adapted, history = adaptation.adapt_attention(
        student, params, teacher, batches, steps, schedule, param_set=param_set,
        normaliser_margin=margin, normaliser_weight=weight,
    )  # fmt: skip
    bar.close()
    after = adaptation.distillation_distance(student, adapted, teacher, params, held_out)
    log(f"held-out hidden-state distance to the original model: {before:.4f} -> {after:.4f}")
    floors = adaptation.rfa_normaliser_floor(student, adapted, held_out)
    if floors and min(floors) < adaptation.NORMALISER_FLOOR_WARN:
        worst = floors.index(min(floors))
        log(f"warning: RFA normalisers down to {floors[worst]:.1e} in layer {worst} on held-out text: "
            "the MPC forward will drift from plaintext there (benchmarks/rfa_normalisers.py; "
            "raise --normaliser-weight or --normaliser-margin)")  # fmt: skip

    hf = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    model = FlaxAutoModel.from_config(hf, _do_init=True)
    trunk = {**dict(model.params), **adapted[student.trunk_name]}
    info = {
        "base_checkpoint": str(checkpoint),
        "attention": dataclasses.asdict(attention),
        "gelu": gelu_impl,
        "param_set": param_set,
        "steps": steps,
        "learning_rate": learning_rate,
        "normaliser_margin": margin,
        "normaliser_weight": weight,
        "public_rows": len(texts),
        "heldout_distance_before": before,
        "heldout_distance_after": after,
        "heldout_rfa_normaliser_floor": floors,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, params=trunk)
        for name in TOKENIZER_FILES:
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, tmp / name)
        (tmp / ADAPTATION_FILE).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
