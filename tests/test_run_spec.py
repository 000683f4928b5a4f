"""The run spec: typed, validated at the edge, one line naming the field, stable hash."""

import subprocess
import sys
from pathlib import Path

import pytest

from secfwt_jax.run.spec import (
    SpecError,
    apply_overrides,
    load_spec,
    read_spec_file,
    spec_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_dict() -> dict:
    return read_spec_file(TINY)


def error_of(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, TINY.parent)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(path):
    if path.name.startswith("compile_"):
        pytest.skip("compile configs are not run specs")
    spec = load_spec(path)
    assert spec.name and len(spec.spec_hash) == 64


def test_the_m16_spec_is_the_main_run_with_only_the_cheap_model_changed():
    main = load_spec(ROOT / "configs" / "minilm_sentiment.yaml").model_dump()
    m16 = load_spec(ROOT / "configs" / "minilm_sentiment_m16.yaml").model_dump()
    changed = {
        section if key is None else f"{section}.{key}"
        for section in main
        for key in (main[section] if isinstance(main[section], dict) else [None])
        if (main[section] if key is None else main[section][key])
        != (m16[section] if key is None else m16[section][key])
    }
    # and the length: m16's figures were measured at 16 tokens, the main run's length until
    # 2026-12-07 (it moved to 32 with the trunk's speed-up; docs/results.md)
    assert changed == {"name", "model.adapted_checkpoint", "model.attention", "model.gelu", "output.dir", "data.max_len"}  # fmt: skip
    assert m16["data"]["max_len"] == 16
    assert m16["model"]["gelu"] == "relu" and m16["model"]["attention"]["num_features"] == 16


def test_relative_paths_resolve_against_the_spec_file():
    spec = load_spec(TINY)
    assert spec.resolve(spec.data.path) == (ROOT / "tests" / "data" / "sentiment_small.csv")
    assert (spec.resolve(spec.model.tokenizer) / "vocab.txt").is_file()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"tuning": {"bogus": 1}}, "tuning.bogus: unknown key"),
        ({"tuning": {"spsa": {"eps": -1.0}}}, "tuning.spsa.eps: must be positive"),
        ({"tuning": {"spsa": {"num_directions": "many"}}}, "tuning.spsa.num_directions"),
        ({"tuning": {"trainable": {"kind": "everything"}}}, "tuning.trainable.kind"),
        ({"tuning": {"method": "cma"}}, "tuning.trainable.kind: method 'cma'"),
        ({"data": {"labels": ["only"]}}, "data.labels"),
        ({"data": {"k": 0}}, "data.k"),
        ({"protocol": {"name": "SPDZ"}}, "protocol.name"),
        ({"parties": {"data_owner": "alice"}}, "parties.data_owner: must differ"),
        ({"parties": {"data_owner": "dave"}}, "parties.data_owner: 'dave' is not a compute party"),
        ({"protocol": {"name": "SEMI2K"}}, "parties.compute: SEMI2K needs 2"),
        ({"model": {"checkpoint": "x"}}, "model.checkpoint: give exactly one"),
        (
            {"model": {"attention": {"num_features": 0}}},
            "model.attention.num_features: must be positive",
        ),  # fmt: skip
        (
            {"model": {"architecture": {"hidden_size": 33}}},
            "model.architecture.hidden_size: 33 is not divisible",
        ),
        (
            {"model": {"architecture": {"family": "llama", "num_kv_heads": 3}}},
            "model.architecture.num_kv_heads: 2 heads are not divisible into 3 groups",
        ),
        ({"backend": {"kind": "ray"}}, "backend.kind"),
        (
            {"tuning": {"cma": {"generations": 50}}},
            "tuning.cma.generations: a CMA-ES run's generations is tuning.steps",
        ),  # fmt: skip
        (
            {"tuning": {"cma": {"seed": 3}}},
            "tuning.cma.seed: a CMA-ES run's seed is the run's seed",
        ),  # fmt: skip
        ({"tuning": {"cma": {"population": 1}}}, "tuning.cma.population"),
        ({"surprise": True}, "surprise: unknown key"),
    ],
)
def test_bad_values_are_refused_with_one_line_naming_the_field(change, field):
    data = tiny_dict()
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            merged = dict(data[section])
            for k, v in value.items():
                merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v  # fmt: skip
            data[section] = merged
        else:
            data[section] = value
    assert field in error_of(data)


def test_semi2k_with_a_trusted_first_party_is_refused_on_a_cluster():
    data = apply_overrides(tiny_dict(), ["protocol.name=SEMI2K", "parties.compute=[alice, bob]", "backend.kind=cluster"])  # fmt: skip
    assert "protocol.beaver_type: SEMI2K with TrustedFirstParty is insecure" in error_of(data)
    ok = apply_overrides(data, ["protocol.beaver_type=TrustedThirdParty"])
    assert spec_from_dict(ok, TINY.parent).protocol.beaver_type == "TrustedThirdParty"


def test_semi2k_specs_take_the_sin_cos_order_that_opens_each_value_once():
    semi2k = ["protocol.name=SEMI2K", "parties.compute=[alice, bob]"]
    assert load_spec(TINY).model.attention.trig_schedule == "stacked"  # ABY3 pays per output
    assert load_spec(TINY, semi2k).model.attention.trig_schedule == "reused"
    explicit = load_spec(TINY, [*semi2k, "model.attention.trig_schedule=stacked"])
    assert explicit.model.attention.trig_schedule == "stacked"
    data = apply_overrides(tiny_dict(), semi2k)
    del data["model"]["attention"]  # the spec's default attention, under SEMI2K
    assert spec_from_dict(data, TINY.parent).model.attention.trig_schedule == "reused"
    bad = apply_overrides(tiny_dict(), ["model.attention.trig_schedule=interleaved"])
    assert "attention.trig_schedule" in error_of(bad)


def test_semi2k_caches_its_openings_unless_the_spec_says_not():
    from secfwt_jax.compile.precision import CACHE_OPENINGS
    from secfwt_jax.compile.protocols import preset_of

    semi2k = ["protocol.name=SEMI2K", "parties.compute=[alice, bob]"]
    assert CACHE_OPENINGS in preset_of(load_spec(TINY, semi2k)).rewrites
    off = load_spec(TINY, [*semi2k, "protocol.cache_openings=false"])
    assert CACHE_OPENINGS not in preset_of(off).rewrites
    assert off.spec_hash != load_spec(TINY, semi2k).spec_hash  # the parties' handshake sees it
    assert CACHE_OPENINGS not in preset_of(load_spec(TINY)).rewrites  # ABY3


def test_cma_generations_are_the_steps_and_its_seed_the_runs():
    data = tiny_dict()
    data["tuning"] = {**data.get("tuning", {}), "cma": {"population": 6, "sigma0": 0.5}, "steps": 7}
    data["seed"] = 4
    cfg = spec_from_dict(data, TINY.parent).tuning.cma_config(4)
    assert (cfg.population, cfg.sigma0, cfg.generations, cfg.seed) == (6, 0.5, 7, 4)


def test_overrides_change_the_value_and_the_hash():
    base = load_spec(TINY)
    changed = load_spec(TINY, ["tuning.steps=7", "tuning.spsa.eps=0.5"])
    assert (changed.tuning.steps, changed.tuning.spsa.eps) == (7, 0.5)
    assert changed.spec_hash != base.spec_hash
    assert load_spec(TINY).spec_hash == base.spec_hash  # deterministic


def test_a_malformed_override_is_refused():
    with pytest.raises(SpecError, match="--set 'tuning.steps': expected key=value"):
        load_spec(TINY, ["tuning.steps"])


def test_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match="cannot parse YAML"):
        load_spec(bad)


def test_the_cli_exits_2_with_one_line_for_a_bad_spec(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("steps: 3", "steps: -3"))
    out = subprocess.run(
        [sys.executable, "-m", "secfwt_jax.runtime.cli", "finetune", str(bad)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("secfwt: error:")]
    assert lines == ["secfwt: error: tuning.steps: Input should be greater than or equal to 1"]


def test_spec_sections_default_as_the_library_configs_they_mirror():
    """One source of truth: a setting left out of a spec means what the library's own
    config means by default (an inline Architecture and ModelConfig, HeadSpec and
    HeadConfig, ProtocolSpec and ProtocolPreset)."""
    import dataclasses

    from secfwt_jax.compile.protocols import ProtocolPreset
    from secfwt_jax.models.config import ModelConfig
    from secfwt_jax.models.heads import HeadConfig
    from secfwt_jax.run.spec import Architecture, HeadSpec, ProtocolSpec

    pairs = ((Architecture, ModelConfig), (HeadSpec, HeadConfig), (ProtocolSpec, ProtocolPreset))
    for section, config in pairs:
        library = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}  # fmt: skip
        shared = set(section.model_fields) & set(library)
        assert shared, section
        for name in shared:
            assert section.model_fields[name].default == library[name], (section.__name__, name)
