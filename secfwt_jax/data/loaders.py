"""Load labelled text from local CSV, TSV and JSONL files into a typed `LabelledText`.

    data = load_labelled("reviews.csv", text_column="text", label_column="sentiment",
                         keep_labels=("negative", "positive"))
    data.texts        # list[str], length R
    data.labels       # int64 [R], class indices into data.label_names
    data.label_names  # ("negative", "positive"): class index -> name

Files are read as UTF-8 with `errors="replace"` (real corpora carry stray bytes; those become
U+FFFD instead of aborting the load). Every problem raises a one-line `DataError` that names
the file and the field, row or line at fault.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and the field or row."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class LabelledText:
    """Texts with integer class labels.

    Attributes:
      texts: R strings.
      labels: int64 [R], each in range(len(label_names)).
      label_names: class index -> label name.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if len(self.texts) != labels.shape[0]:
            raise DataError(f"labels: {labels.shape[0]} labels for {len(self.texts)} texts")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise DataError(f"labels: values must lie in [0, {len(self.label_names)})")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def counts(self) -> dict[str, int]:
        """Rows per class name, in class order."""
        per_class = np.bincount(self.labels, minlength=self.num_labels)
        return {name: int(n) for name, n in zip(self.label_names, per_class, strict=True)}

    def subset(self, indices) -> LabelledText:
        """The rows at `indices` (int [M]), same label names."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledText([self.texts[i] for i in idx], self.labels[idx], self.label_names)


def _csv_rows(
    path: Path, delimiter: str, columns: dict[str, str]
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row dict) for each data row; the header must name `columns` (name->role)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file")
            for column, role in columns.items():
                if column not in header:
                    raise DataError(
                        f"{path}: missing {role} column {column!r} (header has {header})"
                    )
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {reader.line_num}: unreadable row with {len(row)} "
                        f"fields, the header has {len(header)}"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: unreadable row ({e})") from e


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {line_num}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_num}: expected a JSON object")
            yield line_num, row


def _field(path: Path, line_num: int, row: dict, column: str, role: str) -> str:
    if column not in row:
        raise DataError(f"{path}: missing {role} column {column!r} (line {line_num})")
    value = row[column]
    if not isinstance(value, str | int | bool):
        raise DataError(f"{path}: line {line_num}: {role} column {column!r} is not a string")
    return str(value)


def load_labelled(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    keep_labels: Sequence[str] | None = None,
    file_format: str | None = None,
) -> LabelledText:
    """Read a CSV, TSV or JSONL file of labelled texts.

    Args:
      path: the file; its suffix (.csv, .tsv, .jsonl, .ndjson) picks the format unless
        `file_format` ("csv" | "tsv" | "jsonl") is given.
      text_column, label_column: field names (CSV header or JSON keys).
      labels: the class names in class-index order. Every kept row's label must be one of
        them, and every class must have at least one row. Default: `keep_labels` if given,
        else the sorted distinct labels found.
      keep_labels: drop rows whose label is not in this list (e.g. keep only
        positive/negative of a three-way corpus).

    Returns:
      LabelledText with R rows (file order).
    """
    path = Path(path)
    fmt = file_format or FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"{path}: unknown format {path.suffix!r}; pass file_format=csv|tsv|jsonl")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if labels is not None and len(set(map(str, labels))) != len(labels):
        raise DataError(f"labels: duplicate names in {list(labels)}")
    columns = {text_column: "text", label_column: "label"}
    if fmt == "jsonl":
        rows = _jsonl_rows(path)
    else:
        rows = _csv_rows(path, "\t" if fmt == "tsv" else ",", columns)

    keep = None if keep_labels is None else set(map(str, keep_labels))
    names = labels if labels is not None else keep_labels
    allowed = None if names is None else {str(n): i for i, n in enumerate(names)}
    texts, raw_labels, seen = [], [], 0
    for line_num, row in rows:
        seen += 1
        label = _field(path, line_num, row, label_column, "label")
        text = _field(path, line_num, row, text_column, "text")
        if keep is not None and label not in keep:
            continue
        if allowed is not None and label not in allowed:
            raise DataError(
                f"{path}: line {line_num}: label {label!r} is not in the label list "
                f"{sorted(allowed)} (column {label_column!r})"
            )
        texts.append(text)
        raw_labels.append(label)
    if seen == 0:
        raise DataError(f"{path}: empty file (no data rows)")
    if not texts:
        raise DataError(f"{path}: no rows left after keep_labels={sorted(keep or ())}")
    if allowed is None:
        allowed = {name: i for i, name in enumerate(sorted(set(raw_labels)))}
    ids = np.array([allowed[name] for name in raw_labels], dtype=np.int64)
    label_names = tuple(allowed)
    empty = [
        n
        for n, c in zip(label_names, np.bincount(ids, minlength=len(allowed)), strict=True)
        if c == 0
    ]
    if empty:
        raise DataError(f"{path}: empty class {empty[0]!r}: no rows in column {label_column!r}")
    return LabelledText(texts, ids, label_names)
