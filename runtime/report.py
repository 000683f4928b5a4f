"""The run report: JSON (spec, hash, costs, losses, accuracies, reference) and a PNG of the
curves, each written atomically into the run's output directory.

Both are owner-only (0600): a party's report holds what that party alone may know (the
data owner's losses, predictions and accuracies; with the plaintext reference, everything
the operator saw), and the file mode is what keeps other users of the host out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secfwt_jax.compile.protocols import share_bytes
from secfwt_jax.files import write_atomic, write_json_atomic

REPORT_JSON, CURVES_PNG = "report.json", "curves.png"


def check_output_dir(path: Path) -> None:
    """Refuse an unusable output directory before any work is done (one line)."""
    from secfwt_jax.files import check_writable_dir

    check_writable_dir(path, "output.dir")


REPORT_ALLOWANCE = 4 << 20  # report.json and curves.png: tens of KB; room to spare


def expected_output_bytes(spec, trainable_elements: int, parties: list[str]) -> dict[str, int]:
    """What a run writes into its output folder for `parties` (all of them on the
    simulator, one on a cluster), from public facts: checkpoints (keep + 1 steps exist
    while the newest is written), the tuned result, reports. Share files carry about 10%
    of framing; the estimate allows 25%."""
    share = int(1.25 * share_bytes(spec.protocol.name, spec.protocol.field, trainable_elements))
    every, keep = spec.checkpoint.every, spec.checkpoint.keep
    out = {"checkpoints": len(parties) * (keep + 1) * share if every else 0}
    receiver = spec.parties.receiver
    if receiver is None:
        out["tuned shares"] = len(parties) * share
    else:
        out["tuned parameters"] = int(1.25 * 4 * trainable_elements) if receiver in parties else 0  # fmt: skip
    out["reports and curves"] = REPORT_ALLOWANCE * len(parties)
    return out


def check_free_space(out_dir: Path, expected: dict[str, int]) -> None:
    """Refuse, before any work, a run whose outputs would not fit on the output folder's
    disk (one line with both figures), rather than fail at its end with the tuning lost."""
    import shutil

    probe = Path(out_dir)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free, need = shutil.disk_usage(probe).free, sum(expected.values())
    if free < need:
        parts = ", ".join(f"{name} {size / 1e6:,.1f} MB" for name, size in expected.items() if size)  # fmt: skip
        raise ValueError(f"output.dir: {probe} has {free / 1e6:,.1f} MB free; this run writes about {need / 1e6:,.1f} MB there ({parts})")  # fmt: skip


def plot_curves(report: dict[str, Any], path: Path) -> Path | None:
    """Loss per step (MPC and plaintext) and accuracy before/after; None if nothing to plot."""
    mpc = report.get("mpc") or {}
    ref = report.get("plaintext_reference") or {}
    if not mpc.get("losses") and mpc.get("accuracy_after") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if mpc.get("losses"):
        ax1.plot(mpc["losses"], label="MPC (revealed to the data owner)")
    if ref.get("losses"):
        ax1.plot(ref["losses"], "--", label="plaintext reference")
    ax1.set_xlabel("step" if report["spec"]["tuning"]["method"] == "spsa" else "generation")
    ax1.set_ylabel("training loss")
    ax1.legend()
    names, values = [], []
    for label, value in (
        ("MPC before", mpc.get("accuracy_before")),
        ("MPC after", mpc.get("accuracy_after")),
        ("plain before", (ref.get("before") or {}).get("accuracy")),
        ("plain after", (ref.get("after") or {}).get("accuracy")),
        ("full test before", (ref.get("before") or {}).get("full_test_accuracy")),
        ("full test after", (ref.get("after") or {}).get("full_test_accuracy")),
    ):
        if value is not None:
            names.append(label)
            values.append(100 * value)
    ax2.bar(names, values, color=["#999", "#1f77b4"] * 3)
    ax2.set_ylabel("test accuracy (%)")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{report['spec']['name']}: {report['spec']['tuning']['method']} under {report['spec']['protocol']['name']}")  # fmt: skip
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), private=True)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.json (and curves.png when there are curves) into `out_dir`."""
    out_dir = Path(out_dir)
    public = dict(report)
    paths = {"report": str(out_dir / REPORT_JSON)}
    png = plot_curves(public, out_dir / CURVES_PNG)
    if png is not None:
        paths["curves"] = str(png)
    public["files"] = paths
    write_json_atomic(out_dir / REPORT_JSON, public, private=True)
    return paths
