"""The layer rule: secfwt_jax/ is pure JAX, compile/ never reaches SecretFlow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "secfwt_jax": {"spu", "libspu", "secretflow", "secfwt_jax.compile", "secfwt_jax.runtime"},
    "compile": {"secretflow", "secfwt_jax.runtime"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violates(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_follow_the_design(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer}/ has no Python files"
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(imported_modules(path))
        if violates(module, FORBIDDEN[layer])
    ]
    assert not bad, "; ".join(bad)


def test_rule_checker_catches_a_violation(tmp_path):
    offender = tmp_path / "bad.py"
    offender.write_text("import secretflow as sf\nfrom spu.utils import simulation\n")
    mods = imported_modules(offender)
    assert violates("secretflow", FORBIDDEN["compile"]) and "secretflow" in mods
    assert any(violates(m, FORBIDDEN["secfwt_jax"]) for m in mods)


def test_subpackages_install_under_one_namespace():
    import secfwt_jax.compile
    import secfwt_jax.runtime

    assert Path(secfwt_jax.compile.__file__).parent == ROOT / "compile"
    assert Path(secfwt_jax.runtime.__file__).parent == ROOT / "runtime"


def test_no_top_level_compile_or_runtime_module_is_installed(tmp_path):
    # Run from an empty directory so the repository root is not on sys.path.
    probe = (
        "import importlib.util as u, secfwt_jax.compile, secfwt_jax.runtime;"
        "print(u.find_spec('compile'), u.find_spec('runtime'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "None None"
