"""Per-party checkpoints of an SPSA run: each party's own shares of the trainable state.

Every `checkpoint.every` steps each compute party writes, into its own folder,

    <out>/<party>/checkpoints/step-000012.shares   its share of theta (the backend's format)
    <out>/<party>/checkpoints/step-000012.json     step, spec hash, backend, protocol, the
                                                   SHA-256 of the shares file beside it and
                                                   of the private inputs the party put in
                                                   (none for a helper); the data owner adds
                                                   its own losses so far

both atomically (temp file, fsync, rename), the JSON last: a step counts as held only when
its JSON exists, names the same spec hash and backend, and its shares file is there with
the digest the record names. A truncated or altered shares file is named in one log line
and not used, so a resume falls back to the newest intact step. A party never writes
another party's shares, and never plaintext it does not own. A resumed run starts from the
newest step that every party holds (`common_step`; on a cluster the parties exchange their
lists in the handshake), and each owner then checks that the step was made from the same
private inputs as this run (`check_inputs`): another `--private-seed`, other weights or
other data would mix two models, so the run stops with one line.

The digests guard against accidents (a full disk, a bad copy, a flipped bit, a changed
flag), not against someone who can write the party's folder: they sit beside the files.
The inputs digest stays in the owner's own 0600 record and is never sent to another party
(a hash of a low-entropy seed could be searched).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from secfwt_jax.files import file_sha256, write_json_atomic

_STEP = re.compile(r"^step-(\d{6,})\.json$")


def checkpoint_dir(out_dir: str | Path, party: str) -> Path:
    return Path(out_dir) / party / "checkpoints"


def shares_path(out_dir: str | Path, party: str, step: int) -> Path:
    return checkpoint_dir(out_dir, party) / f"step-{step:06d}.shares"


def meta_path(out_dir: str | Path, party: str, step: int) -> Path:
    return checkpoint_dir(out_dir, party) / f"step-{step:06d}.json"


def inputs_sha256(*trees: Any) -> str:
    """A digest of a party's private inputs: every array leaf's dtype, shape and bytes."""
    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(trees):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_meta(
    out_dir: str | Path,
    party: str,
    step: int,
    facts: Mapping[str, Any],
    inputs_digest: str | None = None,
) -> str:
    """The step's record at `party` (after its shares are on disk): the facts, the shares
    file's digest, and the digest of the party's own private inputs (None for a helper)."""
    record = {
        "step": step,
        "party": party,
        **facts,
        "shares_sha256": file_sha256(shares_path(out_dir, party, step)),
        "inputs_sha256": inputs_digest,
    }  # the owners' records hold an inputs digest and the data owner's its losses: 0600
    return str(write_json_atomic(meta_path(out_dir, party, step), record, private=True))


def read_meta(out_dir: str | Path, party: str, step: int) -> dict[str, Any]:
    return json.loads(meta_path(out_dir, party, step).read_text())


def held_steps(
    out_dir: str | Path,
    party: str,
    spec_hash: str,
    backend: str,
    verify: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[int]:
    """The complete checkpoints `party` holds for this spec and backend, ascending. With
    `verify`, a step whose shares file is missing or does not match its record's digest
    is left out, and `log` gets one line naming the file."""
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
            if log:
                log(f"checkpoint {path}: unreadable record; step {step} not used")
            continue
        if meta.get("spec_hash") != spec_hash or meta.get("backend") != backend:
            continue
        shares = shares_path(out_dir, party, step)
        if not shares.is_file():
            continue
        if verify and file_sha256(shares) != meta.get("shares_sha256"):
            if log:
                log(f"checkpoint {shares}: does not match the digest in its record (truncated, altered or from another version); step {step} not used")  # fmt: skip
            continue
        steps.append(step)
    return sorted(steps)


def check_inputs(out_dir: str | Path, party: str, step: int, inputs_digest: str | None) -> bool:
    """Refuse (one line) to resume `party` from a step made from other private inputs."""
    path = meta_path(out_dir, party, step)
    recorded = read_meta(out_dir, party, step).get("inputs_sha256")
    if recorded != inputs_digest:
        raise ValueError(
            f"--resume: {path} was made from other private inputs at {party} than this run's "
            "(another --private-seed, other weights or other data); resuming would mix two "
            "models. Run with the inputs it was made from, or without --resume (or another "
            "output.dir) to start afresh"
        )
    return True


def common_step(held: Mapping[str, list[int]]) -> int:
    """The newest step every party holds; 0 (start afresh) if there is none."""
    sets = [set(steps) for steps in held.values()]
    common = set.intersection(*sets) if sets else set()
    return max(common, default=0)


def prune(out_dir: str | Path, party: str, keep: int, spec_hash: str, backend: str) -> None:
    """Delete all but the newest `keep` complete checkpoints of `party` (JSON first, so a
    crash in between leaves an incomplete step, never a record without its shares)."""
    for step in held_steps(out_dir, party, spec_hash, backend, verify=False)[:-keep]:
        meta_path(out_dir, party, step).unlink(missing_ok=True)
        shares_path(out_dir, party, step).unlink(missing_ok=True)


__all__ = [
    "check_inputs",
    "checkpoint_dir",
    "common_step",
    "held_steps",
    "inputs_sha256",
    "meta_path",
    "prune",
    "read_meta",
    "shares_path",
    "write_meta",
]
