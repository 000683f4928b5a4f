"""Tokenise labelled text into the numpy batch dict that `models.classifier` consumes.

    batch = encode(data.texts, data.labels, tokenizer, max_len=64, template=template,
                   head_kind="mlm", num_labels=2)
      input_ids       int32 [B, N]  (or one-hot float32 [B, N, V] with one_hot_vocab=V)
      attention_mask  float32 [B, N], 1 for real tokens, right padding
      token_type_ids  int32 [B, N] zeros (only if the tokenizer uses them, e.g. BERT)
      select          float32 [B, N] one-hot: the mask slot (mlm) or last prompt token (lm)
      labels          float32 [B, C] one-hot (only if labels are given)

Over-long texts are cut from the end of the text part only, so the template's words and its
mask slot always survive; one warning counts the rows cut.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from secfwt_jax.data.loaders import DataError
from secfwt_jax.data.templates import MASK, TEXT, PromptTemplate

HEAD_KINDS = ("linear", "mlm", "lm")


def _special_offset(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the content ([CLS], <s>, none)."""
    return tokenizer.build_inputs_with_special_tokens([-1]).index(-1)


def _content_ids(texts, tokenizer, max_len: int, parts) -> tuple[list[list[int]], list[int], int]:
    """Token ids of each filled-in prompt (no special tokens), the mask index, rows cut."""
    literal = {
        i: tokenizer.encode(p, add_special_tokens=False)
        for i, p in enumerate(parts)
        if isinstance(p, str)
    }
    text_slot = next(p for p in parts if p[0] == TEXT)
    text_ids = tokenizer([text_slot[1] + t for t in texts], add_special_tokens=False, verbose=False)
    fixed = sum(map(len, literal.values())) + sum(p == (MASK,) for p in parts)
    budget = max_len - fixed - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise DataError(f"max_len={max_len}: template and special tokens leave no room for text")
    rows, mask_at, cut = [], [], 0
    for ids in text_ids["input_ids"]:
        cut += len(ids) > budget
        row, at = [], -1
        for i, part in enumerate(parts):
            if isinstance(part, str):
                row += literal[i]
            elif part[0] == TEXT:
                row += ids[:budget]
            else:
                at = len(row)
                row.append(tokenizer.mask_token_id)
        rows.append(row)
        mask_at.append(at)
    return rows, mask_at, cut


def encode(
    texts: Sequence[str],
    labels,
    tokenizer,
    max_len: int,
    *,
    template: PromptTemplate | None = None,
    head_kind: str = "linear",
    num_labels: int | None = None,
    one_hot_vocab: int | None = None,
) -> dict[str, np.ndarray]:
    """Encode B texts (and int labels [B] or None) into the batch dict (module doc).

    Args:
      tokenizer: a Hugging Face tokenizer (its special tokens, pad and mask ids are used).
      max_len: N, the padded length; longer prompts are truncated in the text part.
      template: optional prompt; required with a `{mask}` for head_kind "mlm".
      head_kind: "linear" (no select), "mlm" or "lm" (see models.heads).
      num_labels: C for the one-hot labels; default len(template.verbalizer).
      one_hot_vocab: V; if given, input_ids is one-hot float32 [B, N, V] (the MPC form).
    """
    if head_kind not in HEAD_KINDS:
        raise DataError(f"head_kind: unknown {head_kind!r}, expected one of {HEAD_KINDS}")
    if len(texts) == 0:
        raise DataError("encode: no texts to encode (empty input)")
    if head_kind == "mlm" and (template is None or not template.has_mask):
        raise DataError("template: head_kind 'mlm' needs a template with a {mask} slot")
    parts = template.parts(head_kind) if template is not None else [(TEXT, "")]
    if (MASK,) in parts and tokenizer.mask_token_id is None:
        raise DataError("template: {mask} needs a tokenizer with a mask token (or head 'lm')")
    content, mask_at, cut = _content_ids(list(texts), tokenizer, max_len, parts)
    if cut:
        warnings.warn(
            f"encode: truncated {cut} of {len(content)} texts to fit max_len={max_len}",
            stacklevel=2,
        )
    offset = _special_offset(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch_size = len(content)
    input_ids = np.full((batch_size, max_len), pad, dtype=np.int32)
    attention_mask = np.zeros((batch_size, max_len), dtype=np.float32)
    select = np.zeros((batch_size, max_len), dtype=np.float32)
    for b, row in enumerate(content):
        if not row and head_kind == "lm":
            raise DataError(f"texts: row {b} has no tokens, nothing to predict from")
        ids = tokenizer.build_inputs_with_special_tokens(row)
        input_ids[b, : len(ids)] = ids
        attention_mask[b, : len(ids)] = 1.0
        if head_kind == "mlm":
            select[b, offset + mask_at[b]] = 1.0
        elif head_kind == "lm":
            select[b, offset + len(row) - 1] = 1.0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in tokenizer.model_input_names:
        batch["token_type_ids"] = np.zeros_like(input_ids)
    if head_kind != "linear":
        batch["select"] = select
    if labels is not None:
        batch["labels"] = one_hot_labels(labels, num_labels, template, batch_size)
    if one_hot_vocab is not None:
        batch["input_ids"] = one_hot_ids(input_ids, one_hot_vocab)
    return batch


def one_hot_labels(labels, num_labels, template, batch_size: int) -> np.ndarray:
    """int [B] -> float32 [B, C]."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_labels is None:
        if template is None or not template.verbalizer:
            raise DataError("num_labels: required when the template has no verbalizer")
        num_labels = len(template.verbalizer)
    if labels.shape[0] != batch_size:
        raise DataError(f"labels: {labels.shape[0]} labels for {batch_size} texts")
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise DataError(f"labels: values must lie in [0, {num_labels})")
    return np.eye(num_labels, dtype=np.float32)[labels]


def one_hot_ids(input_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """int [B, N] -> float32 [B, N, V]."""
    if input_ids.max(initial=0) >= vocab_size:
        raise DataError(f"one_hot_vocab={vocab_size}: token id {input_ids.max()} is out of range")
    out = np.zeros(input_ids.shape + (vocab_size,), dtype=np.float32)
    np.put_along_axis(out, input_ids[..., None].astype(np.int64), 1.0, axis=-1)
    return out


def iterate_minibatches(
    batch: dict[str, np.ndarray],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield sub-dicts of `batch_size` rows; the order depends only on (seed, epoch).

    With drop_last=True every minibatch has the same shape, so a jitted or SPU-compiled
    step is traced once.
    """
    sizes = {key: value.shape[0] for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"batch: arrays disagree on the number of rows {sizes}")
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1, got {batch_size}")
    rows = next(iter(sizes.values()))
    order = np.random.default_rng([seed, epoch]).permutation(rows) if shuffle else np.arange(rows)
    stop = rows - rows % batch_size if drop_last else rows
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield {key: value[idx] for key, value in batch.items()}
