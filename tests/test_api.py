"""The Python API (`import secfwt_jax as sf`, runtime/api.py): the README's block runs as
written, results are typed, and importing the package loads no MPC stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python API section has one python block"
    return blocks[0]


def test_the_readme_block_runs_as_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECFWT_CACHE_DIR", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(readme_api_block(), "README.md", "exec"), scope)  # noqa: S102
    sf, result, cost = scope["sf"], scope["result"], scope["cost"]
    assert isinstance(result, sf.FinetuneResult) and isinstance(cost, sf.RunCost)
    assert {p.name for p in cost.programs} >= {"trunk", "predict", "spsa_step"}
    step = next(p for p in cost.programs if p.name == "spsa_step")
    assert step.calls == 2 and step.bytes_per_call > 0
    assert result.accuracy_after is not None and 0 <= result.accuracy_after <= 1
    assert result.agreement_after == 1.0  # the tiny spec asks for the plaintext reference
    assert result.losses is not None and len(result.losses) == 2
    assert result.total_bytes > 0 and result.max_rounds > 0
    assert result.out_dir == Path("runs/api-example")
    assert result.tuned_params.is_file() and "alice" in result.tuned_params.parts
    with np.load(result.tuned_params) as f:
        assert f.files
    assert result.report_path.is_file()
    out = capsys.readouterr().out
    assert "rounds for the run" in out and str(result.tuned_params) in out
    # compile: the programs the run ran, from the cache it filled, written as artifacts
    compiled = sf.compile_programs(scope["spec"], tmp_path / "artifacts")
    assert {c.name for c in compiled} == {p.name for p in cost.programs}
    assert all(c.cache_hit and (c.path / "metadata.json").is_file() for c in compiled)
    assert {c.key for c in compiled} == {p.key for p in cost.programs}


def test_override_validates_and_refuses_in_one_line():
    import secfwt_jax as sf

    spec = sf.load_spec(ROOT / "configs" / "tiny.yaml")
    assert sf.override(spec, "tuning.steps=5").tuning.steps == 5
    assert sf.override(spec, "tuning.steps=5").spec_hash != spec.spec_hash
    with pytest.raises(sf.SpecError, match=r"^tuning\.steps"):
        sf.override(spec, "tuning.steps=0")


def test_a_cluster_run_needs_the_spec_file_and_a_known_backend():
    import secfwt_jax as sf

    spec = sf.load_spec(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(ValueError, match="^spec: a cluster run needs the spec's file"):
        sf.finetune(spec, backend="cluster")
    with pytest.raises(ValueError, match="^backend: 'sim' or 'cluster', not 'ray'"):
        sf.finetune(spec, backend="ray")


def test_importing_the_package_and_its_pure_names_loads_no_mpc_stack():
    probe = (
        "import sys, secfwt_jax as sf; sf.spsa_step; sf.SpsaConfig; sf.Classifier; sf.load_spec;"
        "print(sorted(m for m in ('spu', 'libspu', 'secretflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_every_advertised_name_resolves_and_unknown_names_fail_plainly():
    import secfwt_jax as sf

    for name in sf.__all__:
        assert getattr(sf, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        sf.nope  # noqa: B018
