"""Per-party checkpoints of an SPSA run: each party's own shares of the trainable state.

Every `checkpoint.every` steps each compute party writes, into its own folder,

    <out>/<party>/checkpoints/step-000012.shares   its share of theta (the backend's format)
    <out>/<party>/checkpoints/step-000012.json     step, spec hash, backend, protocol; the
                                                   data owner adds its own losses so far

both atomically (temp file, fsync, rename), the JSON last: a step counts as held only when
its JSON exists, names the same spec hash and its shares file is there. A party never
writes another party's shares, and never plaintext it does not own. A resumed run starts
from the newest step that every party holds (`common_step`; on a cluster the parties
exchange their lists in the handshake).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from secfwt_jax.files import write_json_atomic

_STEP = re.compile(r"^step-(\d{6,})\.json$")


def checkpoint_dir(out_dir: str | Path, party: str) -> Path:
    return Path(out_dir) / party / "checkpoints"


def shares_path(out_dir: str | Path, party: str, step: int) -> Path:
    return checkpoint_dir(out_dir, party) / f"step-{step:06d}.shares"


def meta_path(out_dir: str | Path, party: str, step: int) -> Path:
    return checkpoint_dir(out_dir, party) / f"step-{step:06d}.json"


def write_meta(out_dir: str | Path, party: str, step: int, facts: Mapping[str, Any]) -> str:
    """The step's record at `party` (after its shares are on disk)."""
    record = {"step": step, "party": party, **facts}  # the data owner's holds its losses: 0600
    return str(write_json_atomic(meta_path(out_dir, party, step), record, private=True))


def read_meta(out_dir: str | Path, party: str, step: int) -> dict[str, Any]:
    return json.loads(meta_path(out_dir, party, step).read_text())


def held_steps(out_dir: str | Path, party: str, spec_hash: str, backend: str) -> list[int]:
    """The complete checkpoints `party` holds for this spec and backend, ascending."""
    folder = checkpoint_dir(out_dir, party)
    steps = []
    for path in folder.glob("step-*.json") if folder.is_dir() else ():
        match = _STEP.match(path.name)
        if not match:
            continue
        step = int(match.group(1))
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # unreadable: not held
        same = meta.get("spec_hash") == spec_hash and meta.get("backend") == backend
        if same and shares_path(out_dir, party, step).is_file():
            steps.append(step)
    return sorted(steps)


def common_step(held: Mapping[str, list[int]]) -> int:
    """The newest step every party holds; 0 (start afresh) if there is none."""
    sets = [set(steps) for steps in held.values()]
    common = set.intersection(*sets) if sets else set()
    return max(common, default=0)


def prune(out_dir: str | Path, party: str, keep: int, spec_hash: str, backend: str) -> None:
    """Delete all but the newest `keep` complete checkpoints of `party` (JSON first, so a
    crash in between leaves an incomplete step, never a record without its shares)."""
    for step in held_steps(out_dir, party, spec_hash, backend)[:-keep]:
        meta_path(out_dir, party, step).unlink(missing_ok=True)
        shares_path(out_dir, party, step).unlink(missing_ok=True)


__all__ = [
    "checkpoint_dir",
    "common_step",
    "held_steps",
    "meta_path",
    "prune",
    "read_meta",
    "shares_path",
    "write_meta",
]
