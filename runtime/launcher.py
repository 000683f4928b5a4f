"""Start one OS process per party on this machine and collect their JSON results.

SecretFlow PRODUCTION mode needs one process per party. When one party dies, its peers
do not notice: they block in ``sf.init``'s barrier or in a receive until an RPC timeout of
a minute or more. So the launcher, not the parties, owns failure handling: each party runs
in its own session (process group), the launcher polls all of them against one deadline,
and on the first non-zero exit, on timeout, or on any exception (Ctrl-C included) it kills
every party's whole process group. A failure names the party and carries its stderr tail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secfwt_jax.compile.threads import THREAD_LIMIT_ENV
from secfwt_jax.runtime.cluster import PARTY_WORK_DIR_ENV, ClusterConfig

__all__ = ["PartyFailedError", "PartyProcess", "launch_parties", "offline_env"]

_POLL_S = 0.05
_TAIL_CHARS = 2000


class PartyFailedError(RuntimeError):
    """A party process failed or the run timed out; ``party`` names the first culprit."""

    def __init__(self, message: str, party: str | None = None):
        super().__init__(message)
        self.party = party


@dataclass
class PartyProcess:
    """A running party: its process, where its logs and result go."""

    party: str
    proc: subprocess.Popen
    log_path: Path
    result_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def offline_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for party processes: CPU-only JAX, no telemetry, no thread oversubscription.

    Several parties share this machine's cores, so each is held to one BLAS/OMP thread (and
    one OpenMP thread per SPU matmul);
    ``JAX_PLATFORMS=cpu`` keeps a party from grabbing an accelerator it never uses (the
    SPU runtime computes on CPU); usage stats and HF hub access are switched off.
    """
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "JAX_PLATFORMS": "cpu",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "OPENBLAS_NUM_THREADS": env.get("OPENBLAS_NUM_THREADS", "1"),
            "MKL_NUM_THREADS": env.get("MKL_NUM_THREADS", "1"),
            # SPU's matmuls ask Eigen for 4 OpenMP threads each, which only this caps
            # (`compile.threads`)
            THREAD_LIMIT_ENV: env.get(THREAD_LIMIT_ENV, "1"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    return env


def _tail(path: Path, n: int = _TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace").strip()
    except OSError as e:
        return f"<no log: {e}>"


def _group_gone(pp: PartyProcess, wait_s: float) -> bool:
    """Wait up to ``wait_s`` for the party's process group to vanish."""
    deadline = time.monotonic() + wait_s
    while True:
        pp.proc.poll()  # reap the leader: a zombie leader keeps the group alive
        try:
            os.killpg(pp.proc.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)


def _kill_group(pp: PartyProcess, grace_s: float = 1.0) -> None:
    """SIGTERM, then SIGKILL, the party's whole process group; every wait is bounded."""
    pgid = pp.proc.pid  # start_new_session=True: the leader's pid is the group id
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break  # the group is gone (or, after pid reuse, not ours)
        if _group_gone(pp, wait_s):
            break
    try:
        pp.proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass


def _describe_failures(procs: list[PartyProcess], culprit: PartyProcess | None) -> str:
    parts = []
    order = ([culprit] if culprit else []) + [p for p in procs if p is not culprit]
    for pp in order:
        rc = pp.proc.returncode
        state = "running" if rc is None else f"exit code {rc}"
        parts.append(f"--- party {pp.party} ({state}), log tail:\n{_tail(pp.log_path)}")
    return "\n".join(parts)


def launch_parties(
    cluster: ClusterConfig,
    job: str,
    job_args: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
    *,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    work_dir: str | Path | None = None,
    keep_work_dir: bool = False,
    started: list[PartyProcess] | None = None,
    peer_grace_s: float = 15.0,
) -> dict[str, Any]:
    """Run ``job`` ('module:function') once per party, each in its own process group.

    Each party calls ``job(party, cluster, **job_args)`` (see ``party_main``) and its
    JSON-serialisable return value comes back as ``result[party]``. Raises
    ``PartyFailedError`` (with ``.party``) as soon as any party exits non-zero, or when
    ``timeout_s`` passes; either way every party's process group is killed first. Logs go
    to files in a temporary work dir (pipes could fill up and stall a chatty party), which
    is removed on success unless ``keep_work_dir``; on failure its path is in the message.
    ``started``, if given, receives the ``PartyProcess`` list (tests check the pids).
    After the first failure the others get ``peer_grace_s`` to notice and leave on their
    own (their peer watch names the lost party) before they are killed; the error's first
    line says how each party ended.
    """
    if ":" not in job:
        raise ValueError(f"job must be 'module:function', got {job!r}")
    job_args = dict(job_args or {})
    own_dir = work_dir is None
    wd = Path(tempfile.mkdtemp(prefix="secfwt-parties-")) if own_dir else Path(work_dir)
    wd.mkdir(parents=True, exist_ok=True)
    cluster_path = wd / "cluster.json"
    args_path = wd / "job_args.json"
    cluster_path.write_text(json.dumps(cluster.to_dict()))
    args_path.write_text(json.dumps(job_args))
    run_env = offline_env(env)
    run_env[PARTY_WORK_DIR_ENV] = str(wd)

    procs: list[PartyProcess] = [] if started is None else started
    ok = False
    try:
        for party in cluster.parties:
            log_path = wd / f"{party}.log"
            result_path = wd / f"{party}.result.json"
            cmd = [
                python or sys.executable,
                "-m",
                "secfwt_jax.runtime.party_main",
                "--party",
                party,
                "--cluster",
                str(cluster_path),
                "--job",
                job,
                "--args",
                str(args_path),
                "--result",
                str(result_path),
            ]
            # owner-only: a party's log holds what it may know (the data owner's losses)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=run_env,
                    start_new_session=True,
                )
            procs.append(PartyProcess(party, proc, log_path, result_path))

        deadline = time.monotonic() + timeout_s
        while True:
            pending = []
            for pp in procs:
                rc = pp.proc.poll()
                if rc is None:
                    pending.append(pp)
                elif rc != 0:
                    _wait_all(procs, peer_grace_s)
                    _kill_all(procs)
                    raise PartyFailedError(
                        f"{_link_named(procs, cluster)}party {pp.party!r} failed with exit code {rc} ({_last_line(pp.log_path)}); {_endings(procs, pp)} "
                        f"(work dir {wd})\n{_describe_failures(procs, pp)}",
                        party=pp.party,
                    )
            if not pending:
                break
            if time.monotonic() > deadline:
                _kill_all(procs)
                names = [pp.party for pp in pending]
                raise PartyFailedError(
                    f"timed out after {timeout_s:.0f}s waiting for parties {names} "
                    f"(work dir {wd}):\n{_describe_failures(procs, pending[0])}",
                    party=pending[0].party,
                )
            time.sleep(_POLL_S)

        results: dict[str, Any] = {}
        for pp in procs:
            try:
                payload = json.loads(pp.result_path.read_text())
            except (OSError, ValueError) as e:
                raise PartyFailedError(
                    f"party {pp.party!r} exited 0 but left no readable result ({e}) "
                    f"(work dir {wd}):\n{_describe_failures(procs, pp)}",
                    party=pp.party,
                ) from None
            results[pp.party] = payload["result"]
        ok = True
        return results
    finally:
        # Exited leaders may have left children (or a crash left the rest hanging).
        _kill_all(procs)
        if ok and own_dir and not keep_work_dir:
            shutil.rmtree(wd, ignore_errors=True)


def _wait_all(procs: list[PartyProcess], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while any(pp.proc.poll() is None for pp in procs) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _link_named(procs: list[PartyProcess], cluster: ClusterConfig) -> str:
    """'<the failed link>; ' when a party's log shows a link that failed, else ''."""
    from secfwt_jax.runtime.cluster import describe_link_failure

    for pp in procs:
        named = describe_link_failure(_tail(pp.log_path, 50_000), cluster.parties, pp.party, cluster.spu_peer_ports(pp.party))  # fmt: skip
        if named:
            return f"{named}; "
    return ""


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in _tail(path).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "<empty log>"


def _endings(procs: list[PartyProcess], culprit: PartyProcess) -> str:
    """One line: how each other party ended, with its last log line."""
    parts = []
    for pp in procs:
        if pp is culprit:
            continue
        rc = pp.proc.returncode
        state = "killed by the launcher" if rc is None or rc < 0 else f"exit code {rc}"
        parts.append(f"{pp.party}: {state}: {_last_line(pp.log_path)}")
    return "; ".join(parts)


def _kill_all(procs: list[PartyProcess]) -> None:
    for pp in procs:
        _kill_group(pp)
