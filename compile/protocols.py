"""SPU protocol presets: protocol, ring, fixed-point and approximation settings.

A :class:`ProtocolPreset` is a small, frozen, validated description of how an SPU device
computes. :func:`runtime_config` turns it into the ``spu_pb2.RuntimeConfig`` that every
party's runtime (and the share-making ``Io``) must agree on.

Fixed point: a real ``x`` is stored as ``round(x * 2**fxp_fraction_bits)`` in the ring
``Z_{2^64}`` (FM64) or ``Z_{2^128}`` (FM128). FM64 with 18 fraction bits gives a resolution
of 2**-18 ~ 3.8e-6 and roughly +-2**45 of range (products need twice the fraction bits
before truncation, so keep intermediate values well inside that range).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spu import spu_pb2

from secfwt_jax.run.spec import WORLD_SIZE, RunSpec, truncation_problem

from .precision import CACHE_OPENINGS, DEFAULT_REWRITES, PACKING_REWRITES, packing_rewrite, validate

#: What each protocol assumes about the compute parties. Keep these in user-facing docs.
TRUST: dict[str, str] = {
    "ABY3": (
        "3-party replicated secret sharing; secure against one semi-honest (passive) "
        "corruption out of three (honest majority). No dealer needed. Project default."
    ),
    "SEMI2K": (
        "2-party additive secret sharing, semi-honest. Needs correlated randomness (Beaver "
        "triples) from a trusted third party or a multi-party Beaver source. SPU's default "
        "source, 'TrustedFirstParty', lets rank 0 generate the triples and is NOT secure "
        "outside tests and benchmarks."
    ),
    "CHEETAH": (
        "2-party, semi-honest, no dealer: multiplications use homomorphic encryption and "
        "silent oblivious transfer. Much more communication for small shapes."
    ),
}

#: Parties each protocol runs with.

#: SPU's implementation-defined default fraction bits for each ring.
DEFAULT_FRACTION_BITS: dict[str, int] = {"FM64": 18, "FM128": 26}
#: Bits of each ring.
FIELD_BITS: dict[str, int] = {"FM64": 64, "FM128": 128}
#: Shares of one secret each compute party holds (and receives when an owner shares it):
#: ABY3's replicated scheme keeps two of three; SEMI2K and CHEETAH one.
SHARES_PER_PARTY: dict[str, int] = {"ABY3": 2, "SEMI2K": 1, "CHEETAH": 1}


def share_bytes(protocol: str, field: str, elements: int) -> int:
    """Bytes of one party's shares of `elements` secret elements."""
    return int(elements) * SHARES_PER_PARTY[protocol] * (FIELD_BITS[field] // 8)


#: Exp approximations exposed by spu 0.9.3b0 (``RuntimeConfig.ExpMode``). DEFAULT is Taylor.
#: The project default is PADE: it halves the demo step's MPC-vs-plaintext gap against Taylor at
#: the same bytes, and with it the optional ``tanh_exp`` rewrite is accurate to 1.8e-5
#: (Taylor: 1.9e-3), see :mod:`secfwt_jax.compile.precision` and docs/compile.md.
EXP_MODES: tuple[str, ...] = ("DEFAULT", "PADE", "TAYLOR")

#: SEMI2K Beaver-triple sources (``RuntimeConfig.BeaverType``). Only TrustedFirstParty
#: works without extra services in the simulator; it is NOT secure (rank 0 knows the
#: triples), so :func:`check_cluster_allowed` refuses it unless explicitly allowed.
BEAVER_TYPES: tuple[str, ...] = ("TrustedFirstParty", "TrustedThirdParty", "MultiParty")


#: Truncation after a fixed-point product (``ProtocolPreset.truncation``) and what each costs
#: and risks under SEMI2K FM64 (measured: docs/cost.md, "Probabilistic truncation").
TRUNCATIONS: dict[str, str] = {
    "exact": "SPU's default: the most significant bit is corrected; 48 B and 2 rounds per product",
    "probabilistic": (
        "the local two-party truncation (SecureML; CrypTen's): 32 B and 1 round per product, "
        "but a product x fails silently with probability about |x| 2^(2f) / 2^64 (FM64, f = 18: "
        "|x| 2^-28), off by 2^(64 - 2f)"
    ),
}


@dataclasses.dataclass(frozen=True)
class ProtocolPreset:
    """How the SPU device computes.

    Attributes:
        name: "ABY3" | "SEMI2K" | "CHEETAH".
        field: ring, "FM64" | "FM128".
        fxp_fraction_bits: fixed-point fraction bits; None picks SPU's default for the
            field (FM64: 18, FM128: 26). Must satisfy 0 < bits < field_bits / 2.
        exp_mode: exp approximation, one of :data:`EXP_MODES`.
        exp_iters: Taylor/Pade iterations for exp; 0 = SPU default (8).
        div_goldschmidt_iters: Goldschmidt iterations for reciprocal/division;
            0 = SPU default (2).
        public_random_seed: seed of SPU's *public* PRG (``rng_uniform`` on public bounds).
            Fixed by default so runs are reproducible; it has no bearing on security.
        lower_accuracy_rsqrt: SPU's cheaper, less accurate rsqrt (LayerNorm, l2 norm).
        beaver_type: SEMI2K triple source, one of :data:`BEAVER_TYPES` (ignored by the
            other protocols).
        rewrites: compile-time precision rewrites (``secfwt_jax.compile.precision``). A
            packing rewrite is replaced by the one priced as this protocol pays for a
            secret matmul (`precision.packing_rewrite`: SEMI2K opens both operands).
        truncation: "exact" (SPU's default) or "probabilistic" (SEMI2K only: SPU's
            ``trunc_allow_msb_error``, the local truncation; see :data:`TRUNCATIONS`).
        cache_openings: SEMI2K only: open a value once for all its products (SPU's Beaver
            cache, `openings`); False gives the program without it, for comparisons.
    """

    name: str
    field: str = "FM64"
    fxp_fraction_bits: int | None = None
    exp_mode: str = "PADE"
    exp_iters: int = 0
    div_goldschmidt_iters: int = 0
    public_random_seed: int = 1
    lower_accuracy_rsqrt: bool = False
    beaver_type: str = "TrustedFirstParty"
    rewrites: tuple[str, ...] = DEFAULT_REWRITES
    truncation: str = "exact"
    cache_openings: bool = True

    def __post_init__(self) -> None:
        if self.name not in WORLD_SIZE:
            raise ValueError(
                f"name: unknown protocol {self.name!r}; expected one of {sorted(WORLD_SIZE)}"
            )
        if self.field not in FIELD_BITS:
            raise ValueError(
                f"field: unknown field {self.field!r}; expected one of {sorted(FIELD_BITS)}"
            )
        if self.fxp_fraction_bits is None:
            object.__setattr__(self, "fxp_fraction_bits", DEFAULT_FRACTION_BITS[self.field])
        bits = self.fxp_fraction_bits
        if not isinstance(bits, int) or not 0 < bits < FIELD_BITS[self.field] // 2:
            raise ValueError(
                f"fxp_fraction_bits: {bits!r} out of range for {self.field} "
                f"(need 0 < bits < {FIELD_BITS[self.field] // 2})"
            )
        if self.exp_mode not in EXP_MODES:
            raise ValueError(
                f"exp_mode: unknown mode {self.exp_mode!r}; expected one of {EXP_MODES}"
            )
        if self.beaver_type not in BEAVER_TYPES:
            raise ValueError(
                f"beaver_type: unknown {self.beaver_type!r}; expected one of {BEAVER_TYPES}"
            )
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation: unknown {self.truncation!r}; expected one of {tuple(TRUNCATIONS)}")  # fmt: skip
        problem = truncation_problem(self.name, self.truncation)
        if problem:
            raise ValueError(f"truncation: {problem}")
        # batched products are packed as this protocol prices a secret matmul
        packing = packing_rewrite(self.name, self.truncation)
        rewrites = [packing if r in PACKING_REWRITES else r for r in validate(tuple(self.rewrites))]  # fmt: skip
        # SEMI2K opens each operand of a product: a value with several products is
        # opened once (`openings`); the other protocols have no openings to save
        rewrites = [r for r in rewrites if r != CACHE_OPENINGS]
        if self.name == "SEMI2K" and self.cache_openings:
            rewrites.append(CACHE_OPENINGS)
        object.__setattr__(self, "rewrites", tuple(dict.fromkeys(rewrites)))
        for attr in ("exp_iters", "div_goldschmidt_iters", "public_random_seed"):
            v = getattr(self, attr)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{attr}: must be a non-negative int, got {v!r}")

    @property
    def world_size(self) -> int:
        """Number of compute parties (ABY3: 3, SEMI2K: 2, CHEETAH: 2)."""
        return WORLD_SIZE[self.name]

    @property
    def trust(self) -> str:
        """What this protocol trusts; see :data:`TRUST`."""
        return TRUST[self.name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, including derived world size and trust text."""
        d = dataclasses.asdict(self)
        d["rewrites"] = list(self.rewrites)
        d["world_size"] = self.world_size
        d["trust"] = self.trust
        return d


def preset(name: str, field: str = "FM64", **kw: Any) -> ProtocolPreset:
    """Build a validated preset; ``name`` is case-insensitive ("aby3" works)."""
    return ProtocolPreset(name=str(name).upper(), field=str(field).upper(), **kw)


def preset_of(spec: RunSpec) -> ProtocolPreset:
    """The preset a run spec's `protocol` section names: the one conversion from
    `ProtocolSpec` to `ProtocolPreset`."""
    p = spec.protocol
    return preset(p.name, p.field, fxp_fraction_bits=p.fxp_fraction_bits,
                  exp_mode=p.exp_mode, beaver_type=p.beaver_type, truncation=p.truncation,
                  cache_openings=p.cache_openings)  # fmt: skip


def runtime_config(p: ProtocolPreset, profile: bool = False) -> spu_pb2.RuntimeConfig:
    """The SPU ``RuntimeConfig`` for preset ``p``.

    ``profile=True`` turns on pphlo- and hal-level profiling, which makes each runtime log
    per-op send bytes / send actions (see :mod:`secfwt_jax.compile.cost`).
    """
    cfg = spu_pb2.RuntimeConfig(
        protocol=getattr(spu_pb2.ProtocolKind, p.name),
        field=getattr(spu_pb2.FieldType, p.field),
        fxp_fraction_bits=p.fxp_fraction_bits,
        fxp_exp_mode=getattr(spu_pb2.RuntimeConfig.ExpMode, f"EXP_{p.exp_mode}"),
        fxp_exp_iters=p.exp_iters,
        fxp_div_goldschmidt_iters=p.div_goldschmidt_iters,
        public_random_seed=p.public_random_seed,
        enable_lower_accuracy_rsqrt=p.lower_accuracy_rsqrt,
    )
    if p.name == "SEMI2K":
        cfg.beaver_type = getattr(spu_pb2.RuntimeConfig.BeaverType, p.beaver_type)
        # "exact" keeps SPU's default; "probabilistic" is the local truncation, whose
        # silent failures docs/cost.md ("Probabilistic truncation") measures
        cfg.trunc_allow_msb_error = p.truncation == "probabilistic"
    if profile:
        cfg.enable_pphlo_profile = True
        cfg.enable_hal_profile = True
    return cfg


def spec_runtime_settings(p: ProtocolPreset) -> dict[str, tuple[Any, str]]:
    """The SPU runtime settings a run spec decides, as a cluster's ``spu_runtime_extra``
    spells them: key -> (value, the spec field behind it). A cluster run sets each from
    the spec, as `runtime_config` does in the simulator, so a cluster file may repeat one
    but not change it."""
    settings: dict[str, tuple[Any, str]] = {
        "fxp_exp_mode": (f"EXP_{p.exp_mode}", "protocol.exp_mode"),
        "fxp_fraction_bits": (p.fxp_fraction_bits, "protocol.fxp_fraction_bits"),
    }
    if p.name == "SEMI2K":  # SPU reads these two for SEMI2K only
        settings["beaver_type"] = (p.beaver_type, "protocol.beaver_type")
        settings["trunc_allow_msb_error"] = (p.truncation == "probabilistic", "protocol.truncation")  # fmt: skip
    return settings


def check_cluster_allowed(p: ProtocolPreset, allow_insecure_beaver: bool = False) -> None:
    """Refuse presets that are only safe in tests, before a cluster job starts.

    SEMI2K with the ``TrustedFirstParty`` Beaver source lets rank 0 generate (and so know)
    every multiplication triple, which breaks 2PC security; it runs in a cluster only when
    the user passes ``allow_insecure_beaver=True``. Raises a one-line ValueError.
    """
    if p.name == "SEMI2K" and p.beaver_type == "TrustedFirstParty" and not allow_insecure_beaver:
        raise ValueError(
            "protocol: SEMI2K with beaver_type=TrustedFirstParty is insecure (party 0 knows "
            "all Beaver triples); use ABY3, CHEETAH, a TrustedThirdParty/MultiParty beaver "
            "source, or set protocol.allow_insecure_beaver: true (tests only)"
        )


def input_bound(p: ProtocolPreset) -> float:
    """The largest magnitude an input may have under ``p``'s fixed point.

    A fixed-point value x is stored as x * 2^f in a ring of `bits` bits; a product of two
    such values holds x * y * 2^(2f) before truncation and wraps past 2^(bits - 1). Keeping
    every input below 2^((bits - 2) / 2 - f) keeps a product of two inputs in range
    (FM64, f = 18: 8192). Larger values come back silently wrong, so they are refused.
    """
    bits = FIELD_BITS[p.field]
    return float(2 ** ((bits - 2) // 2 - p.fxp_fraction_bits))


_SHAREABLE_KINDS = {"f", "b"}  # floats and bools; ints are checked separately


def check_shareable(name: str, value: Any, p: ProtocolPreset) -> None:
    """Refuse, with one line naming ``name``, a value SPU would silently corrupt: NaN or inf
    (encoded as about 0), magnitudes past :func:`input_bound` (saturate or overflow), and
    64-bit integers (cut to 32 bits)."""
    import numpy as np

    array = np.asarray(value)
    if array.dtype.kind in "iu":
        if array.dtype.itemsize > 4 and array.size and np.abs(array).max() >= 2**31:
            raise ValueError(f"{name}: int64 values past 2^31 are cut to 32 bits by SPU")
        return
    if array.dtype.kind not in _SHAREABLE_KINDS:
        raise ValueError(f"{name}: dtype {array.dtype} cannot enter SPU (use float32, int32 or bool)")  # fmt: skip
    if array.dtype.kind == "b" or not array.size:
        return
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: NaN or inf values (SPU encodes them as about 0)")
    bound = input_bound(p)
    peak = float(np.abs(array).max())
    if peak > bound:
        raise ValueError(f"{name}: |value| {peak:.3g} exceeds {bound:g}, the input bound of {p.field} with {p.fxp_fraction_bits} fraction bits (products would overflow)")  # fmt: skip
