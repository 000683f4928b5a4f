"""Every notebook in notebooks/ runs top to bottom at its small size, and is committed with
its outputs stripped.

Each notebook reads one environment variable, SECFWT_NOTEBOOK_SIZE ("small" here, "full"
when unset). The kernel is this interpreter's (the project's .venv) and inherits the
environment, so it imports the same secfwt_jax. At small size the notebooks write their
plots and runs into temporary folders, never into docs/ or runs/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600
# The default run executes the two notebooks a newcomer opens first. The other three
# retell paths that default tests already check (the cluster run: test_finetune_cluster.py;
# the privacy study: test_privacy_study.py; the methods: test_loop.py, test_tuning.py), at
# 40-85 s each on 2 cores, so they run with -m slow.
RUNS = [
    "quickstart",
    "cost_analysis",
    pytest.param("accuracy_study", marks=pytest.mark.slow),
    pytest.param("privacy_study", marks=pytest.mark.slow),
    pytest.param("cluster_walkthrough", marks=[pytest.mark.cluster, pytest.mark.slow]),
]


def _notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def test_every_notebook_is_executed_by_this_file():
    listed = sorted(r if isinstance(r, str) else r.values[0] for r in RUNS)
    assert _notebook_names() == listed


@pytest.mark.parametrize("name", _notebook_names())
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"


def _kernel_manager():
    """A kernel on this interpreter (so the notebook imports this checkout's environment)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv[0] = sys.executable  # not whatever 'python3' kernelspec is installed
    return km


@pytest.mark.parametrize("name", RUNS)
def test_notebook_runs_at_small_size(name, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    monkeypatch.setenv("SECFWT_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary outputs
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    km = _kernel_manager()
    client = NotebookClient(
        nb, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()  # raises CellExecutionError (with the cell and traceback) if a cell fails
    finally:  # nbclient leaves a kernel it was handed running (1.3 GB and its threads)
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]  # fmt: skip
    assert not errors
    assert any(c.outputs for c in nb.cells if c.cell_type == "code")
