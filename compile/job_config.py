"""Typed, validated config of a compile job (`secfwt compile CONFIG`).

A config file (YAML or JSON) has one top-level section, ``compile``::

    compile:
      function: spsa_step          # spsa_step | cma_forward | backprop_step | forward
      batch_size: 4
      seq_len: 8
      seed: 0                      # inline model init, LoRA init (not a program input)
      model:                       # either `checkpoint: PATH` (a local HF directory) ...
        family: bert               # ... or a tiny inline architecture
        vocab_size: 64
        hidden_size: 32
        num_layers: 2
        num_heads: 2
        intermediate_size: 64
        max_positions: 32
      attention: {kind: rfa, variant: l2, trig: poly, num_features: 16}   # AttentionConfig
      head: {kind: linear, num_labels: 2}                                 # HeadConfig
      trainable: {kind: full}                                             # TrainableSpec
      spsa: {eps: 1.0e-3, num_directions: 1}                              # SpsaConfig
      cma: {population: 4}                                                # CmaConfig
      protocol: {name: ABY3, field: FM64, fxp_fraction_bits: 18, exp_mode: PADE}

Every error is one line that names the field, e.g. ``compile.model.hidden_size: must be
positive``; unknown keys are rejected. Shapes come from the config alone: no data is read.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from secfwt_jax.models.config import SUPPORTED_ACTIVATIONS, SUPPORTED_FAMILIES, AttentionConfig
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning.cmaes import CmaConfig
from secfwt_jax.tuning.sets import TrainableSpec
from secfwt_jax.tuning.spsa import SpsaConfig

from .protocols import ProtocolPreset

FUNCTIONS: tuple[str, ...] = ("spsa_step", "cma_forward", "backprop_step", "forward")
ROOT = "compile"
_ARCH_FIELDS = (
    "family",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_positions",
)
# Messages of the library dataclasses use Hugging Face names for two ModelConfig fields.
_HF_NAMES = {"model_type": "family", "hidden_act": "activation"}


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Either ``checkpoint`` (a local HF directory) or an inline architecture."""

    checkpoint: str | None = None
    family: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    max_positions: int | None = None
    type_vocab_size: int = 2
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        given = [f for f in _ARCH_FIELDS if getattr(self, f) is not None]
        if self.checkpoint is not None:
            if given:
                raise ValueError(
                    f"checkpoint: cannot be combined with an inline architecture ({given[0]})"
                )
            return
        missing = [f for f in _ARCH_FIELDS if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{missing[0]}: required (or give checkpoint: PATH instead)")
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"family: unknown {self.family!r}; expected one of {SUPPORTED_FAMILIES}")  # fmt: skip
        for name in _ARCH_FIELDS[1:]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if self.type_vocab_size < 0:
            raise ValueError("type_vocab_size: must be >= 0")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activation: unknown {self.activation!r}; expected one of {SUPPORTED_ACTIVATIONS}")  # fmt: skip
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """What to compile: function, shapes, model, trainable set and protocol."""

    model: ModelSection
    function: str = "spsa_step"
    batch_size: int = 8
    seq_len: int = 16
    seed: int = 0
    attention: AttentionConfig = AttentionConfig()
    head: HeadConfig = HeadConfig()
    trainable: TrainableSpec = TrainableSpec()
    spsa: SpsaConfig = SpsaConfig()
    cma: CmaConfig = CmaConfig()
    protocol: ProtocolPreset = ProtocolPreset("ABY3")

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ValueError(f"function: unknown {self.function!r}; expected one of {FUNCTIONS}")
        for name in ("batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive")
        if self.seed < 0:
            raise ValueError("seed: must be >= 0")
        if self.function == "cma_forward" and self.trainable.kind != "prompt":
            raise ValueError(
                f"trainable.kind: cma_forward searches the 'prompt' subspace, got "
                f"{self.trainable.kind!r} (its candidates are public inputs)"
            )
        if self.trainable.cache_trunk and self.function == "forward":
            raise ValueError("trainable.cache_trunk: not for function 'forward'")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, canonical form (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["protocol"] = {k: v for k, v in self.protocol.to_dict().items() if k != "trust"}
        return json.loads(json.dumps(d))


# ---------------------------------------------------------------------------- parsing
_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "attention": AttentionConfig,
    "head": HeadConfig,
    "trainable": TrainableSpec,
    "spsa": SpsaConfig,
    "cma": CmaConfig,
    "protocol": ProtocolPreset,
}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a (simple) type hint; one-line error naming ``path``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{path}: unknown {value!r}; expected one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(path, value, hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path}: expected a list, got {_type_name(value)}")
        return tuple(_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true/false, got {_type_name(value)}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {_type_name(value)} {value!r}")
    elif hint is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    elif hint is str and not isinstance(value, str):
        raise ValueError(f"{path}: expected a string, got {_type_name(value)} {value!r}")
    return value


def _build(path: str, cls: type, data: Any, nested: dict[str, Any] | None = None) -> Any:
    """``cls(**data)`` with unknown keys rejected, types checked, errors prefixed by path."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = dict(nested or {})
    for key, value in data.items():
        if key not in known or key in kwargs:
            raise ValueError(f"{path}.{key}: unknown key; expected one of {sorted(set(known) - set(kwargs))}")  # fmt: skip
        kwargs[key] = _coerce(f"{path}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{path}: {error}") from None
    except ValueError as error:
        raise ValueError(_prefixed(path, str(error))) from None


def _prefixed(path: str, message: str) -> str:
    """Re-root a library message (``hidden_size: ...`` or ``spsa.eps: ...``) at ``path``."""
    message = message.splitlines()[0] if message else "invalid"
    field, sep, rest = message.partition(":")
    if not sep or " " in field.strip():
        return f"{path}: {message}"
    field = field.strip()
    section = path.rsplit(".", 1)[-1]
    if field.startswith(section + "."):
        field = field[len(section) + 1 :]
    if path != ROOT and "." in field:  # already rooted at a sibling section, e.g. trainable.x
        return f"{ROOT}.{field}:{rest}"
    return f"{path}.{_HF_NAMES.get(field, field)}:{rest}"


def config_from_dict(data: Any) -> CompileConfig:
    """Validate a parsed config file (the whole file, with its ``compile`` section)."""
    if not isinstance(data, dict) or set(data) != {ROOT}:
        keys = sorted(data) if isinstance(data, dict) else _type_name(data)
        raise ValueError(f"{ROOT}: the file must hold exactly one top-level section 'compile', got {keys}")  # fmt: skip
    body = data[ROOT]
    if not isinstance(body, dict):
        raise ValueError(f"{ROOT}: expected a mapping, got {_type_name(body)}")
    if "model" not in body:
        raise ValueError(f"{ROOT}.model: required (checkpoint: PATH or an inline architecture)")
    nested = {}
    for name, cls in _SECTIONS.items():
        if name in body:
            section = body[name]
            if name == "protocol" and isinstance(section, dict):  # "aby3" works, as in preset()
                section = {k: v.upper() if k in ("name", "field") and isinstance(v, str) else v for k, v in section.items()}  # fmt: skip
            nested[name] = _build(f"{ROOT}.{name}", cls, section)
    rest = {k: v for k, v in body.items() if k not in _SECTIONS}
    return _build(ROOT, CompileConfig, rest, nested)


def load_config(path: str | Path) -> CompileConfig:
    """Read and validate a ``.yaml``/``.yml``/``.json`` compile config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"config: cannot parse {path}: {first}") from None
    cfg = config_from_dict(data)
    ckpt = cfg.model.checkpoint
    if ckpt is not None and not Path(ckpt).expanduser().is_absolute():
        # A relative checkpoint path is relative to the config file's folder.
        model = dataclasses.replace(cfg.model, checkpoint=str((path.parent / ckpt).resolve()))
        cfg = dataclasses.replace(cfg, model=model)
    return cfg
