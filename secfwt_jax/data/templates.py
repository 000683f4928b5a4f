"""Prompt templates and verbalizers for prompt-based classification (LM-BFF, MeZO).

    template = PromptTemplate("{text} It was {mask} .",
                              {"negative": " terrible", "positive": " great"})
    ids = template.verbalizer_ids(tokenizer, data.label_names)   # one vocab id per class

`{text}` is the example; `{mask}` is the slot the model fills with a verbalizer word. With an
MLM head the slot becomes the tokenizer's mask token. GPT-2 has no mask: the prompt is cut
right before `{mask}` (the rest is dropped) and the next-token scores at the last prompt
token are read, so verbalizer words carry their leading space (" great").
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence

from secfwt_jax.data.loaders import DataError

TEXT, MASK = "text", "mask"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A pattern with one `{text}` and at most one `{mask}`, plus a class -> word map.

    Attributes:
      pattern: e.g. "{text} It was {mask} ." (literal braces are written "{{" and "}}").
      verbalizer: class name -> a word that must be one vocabulary token.
    """

    pattern: str
    verbalizer: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None]
        unknown = sorted(set(fields) - {TEXT, MASK})
        if unknown:
            raise DataError(f"template.pattern: unknown placeholder {{{unknown[0]}}}")
        if fields.count(TEXT) != 1:
            raise DataError("template.pattern: needs exactly one {text}")
        if fields.count(MASK) > 1:
            raise DataError("template.pattern: at most one {mask}")
        object.__setattr__(self, "verbalizer", dict(self.verbalizer))

    @property
    def has_mask(self) -> bool:
        return any(part == (MASK,) for part in self.parts())

    def parts(self, head_kind: str = "mlm") -> list[str | tuple[str, ...]]:
        """The pattern as literal strings and slots `(TEXT,)` / `(MASK,)`, in order.

        A literal's trailing whitespace moves into the following `{text}` so byte-level BPE
        tokenizers see " word" as in the whole sentence, and is dropped before `{mask}`.
        For head_kind "lm" the pattern ends before `{mask}`.
        """
        parts: list[str | tuple[str, ...]] = []
        for literal, field, _, _ in string.Formatter().parse(self.pattern):
            if field == MASK and head_kind == "lm":
                parts.append(literal.rstrip())
                break
            if field is None:
                parts.append(literal)
                continue
            stripped = literal.rstrip()
            parts.append(stripped)
            if field == TEXT:
                parts.append((TEXT, literal[len(stripped) :]))
            else:
                parts.append((MASK,))
        return [p for p in parts if p != ""]

    def render(self, text: str, mask_token: str = "[MASK]") -> str:
        """The filled-in prompt as a string (for reading, not for tokenizing)."""
        return self.pattern.format(text=text, mask=mask_token)

    def verbalizer_ids(self, tokenizer, label_names: Sequence[str]) -> tuple[int, ...]:
        """One vocabulary id per class, in `label_names` order (for `HeadConfig`)."""
        missing = [n for n in label_names if n not in self.verbalizer]
        if missing:
            raise DataError(f"template.verbalizer: no word for class {missing[0]!r}")
        ids = tuple(single_token_id(tokenizer, self.verbalizer[n]) for n in label_names)
        if len(set(ids)) != len(ids):
            raise DataError(f"template.verbalizer: two classes share a token id {ids}")
        return ids


def single_token_id(tokenizer, word: str) -> int:
    """The vocabulary id of `word`; DataError unless it is exactly one known token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise DataError(f"verbalizer word {word!r} is {len(ids)} tokens {pieces}, need 1")
    if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
        raise DataError(f"verbalizer word {word!r} is the unknown token")
    return int(ids[0])
