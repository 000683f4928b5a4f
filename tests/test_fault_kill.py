"""The kill test: SIGKILL one party of a 3-party loopback job at a random step. The others
stop on their own within a bounded time, naming the lost party; no process is left; a
relaunch with --resume ends with the parameters of an uninterrupted run."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from secfwt_jax.run import checkpoints
from secfwt_jax.run.reference import relative_gap
from secfwt_jax.run.spec import load_spec
from secfwt_jax.runtime.cluster_run import launch_local, load_theta
from secfwt_jax.runtime.finetune import PrivateSeeds
from secfwt_jax.runtime.launcher import PartyFailedError, PartyProcess
from secfwt_jax.runtime.liveness import LOST_PEER_EXIT, PeerWatch, answers
from secfwt_jax.runtime.sim_run import finetune_in_simulator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SEED = 31
STEPS = 6
OVERRIDES = [f"tuning.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=10"]


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_peer_watch_names_an_unreachable_and_a_lost_peer():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    failures: list[str] = []
    watch = PeerWatch("alice", {"bob": ("127.0.0.1", port)}, lost_after_s=0.5, interval_s=0.1,
                      on_failure=failures.append).start()  # fmt: skip
    time.sleep(0.5)
    assert not failures and answers("127.0.0.1", port, 1.0)
    server.close()  # bob dies
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.stop()
    assert failures and f"lost party bob (127.0.0.1:{port} stopped answering)" in failures[0]
    failures.clear()
    watch = PeerWatch("alice", {"carol": ("127.0.0.1", port)}, connect_timeout_s=0.3,
                      interval_s=0.1, on_failure=failures.append).start()  # fmt: skip
    time.sleep(1.0)
    watch.stop()
    assert failures == [f"secfwt party alice: peer carol at 127.0.0.1:{port} unreachable after 0 s"]


_PEER = """
import socket, sys, time
from secfwt_jax.runtime.liveness import HeartbeatResponder
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
port = server.getsockname()[1]
with HeartbeatResponder("127.0.0.1", port):
    print(port, flush=True)
    time.sleep(600)
"""


def test_a_stopped_peer_that_still_accepts_connections_is_named_as_hung():
    """SIGSTOP: the kernel still completes TCP handshakes for the frozen process, so only
    the application-level heartbeat notices; the watch names the frozen peer."""
    import subprocess
    import sys

    peer = subprocess.Popen([sys.executable, "-c", _PEER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(peer.stdout.readline())
        failures: list[str] = []
        watch = PeerWatch("alice", {"carol": ("127.0.0.1", port)}, interval_s=0.1,
                          hung_after_s=1.0, on_failure=failures.append).start()  # fmt: skip
        time.sleep(1.5)
        assert not failures and watch._answered.get("carol")  # it answers while running
        os.kill(peer.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while not failures and time.monotonic() - stopped < 10:
            time.sleep(0.05)
        watch.stop()
        assert answers("127.0.0.1", port, 1.0)  # TCP alone would call it alive
        assert len(failures) == 1 and failures[0].startswith("secfwt party alice: lost party carol")
        assert "accepts connections, but its process has not answered a heartbeat for 1 s: stopped or hung" in failures[0]  # fmt: skip
        assert time.monotonic() - stopped < 3.0
    finally:
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait()


def _launch_until_checkpoint(spec, overrides, out, work, party, step, wait_s):
    """Launch the job on three parties in a thread and wait for `party`'s checkpoint of
    `step`. Returns (the thread, the started processes, a list the launch's error joins)."""
    procs: list[PartyProcess] = []
    failure: list[BaseException] = []

    def launch():
        try:
            launch_local(spec, str(TINY), overrides, SEED, out_dir=out, timeout_s=600,
                         work_dir=work, started=procs)  # fmt: skip
        except BaseException as error:  # noqa: BLE001 - inspected by the caller
            failure.append(error)

    thread = threading.Thread(target=launch)
    thread.start()
    marker = checkpoints.meta_path(out, party, step)
    deadline = time.monotonic() + wait_s
    while not marker.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the job never reached {party}'s checkpoint of step {step}"
    return thread, procs, failure


@pytest.mark.cluster
@pytest.mark.slow  # two 3-party launches and a detection wait: about 4.5 min; -m slow runs it
@pytest.mark.timeout(900)
def test_a_killed_party_stops_the_others_and_resume_finishes_the_run(tmp_path):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng = random.Random(seed)
    victim, kill_step = rng.choice(["alice", "bob", "carol"]), rng.randint(1, STEPS - 2)
    print(f"kill test (random seed {seed}): SIGKILL {victim} after its checkpoint of step {kill_step}")  # fmt: skip
    spec = load_spec(TINY, OVERRIDES)
    out = tmp_path / "run"
    thread, procs, failure = _launch_until_checkpoint(spec, OVERRIDES, out, tmp_path / "work1", victim, kill_step, 600)  # fmt: skip
    pid = next(pp.pid for pp in procs if pp.party == victim)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert failure and isinstance(failure[0], PartyFailedError)
    assert time.monotonic() - killed_at < 60
    survivors = [pp for pp in procs if pp.party != victim]
    for pp in survivors:  # they stopped by themselves, naming the lost party
        assert pp.proc.returncode == LOST_PEER_EXIT, (pp.party, pp.proc.returncode)
        assert f"lost party {victim}" in pp.log_path.read_text(errors="replace")
    first_line = str(failure[0]).splitlines()[0]
    assert f"lost party {victim}" in first_line
    assert all(_gone(pp.pid) for pp in procs), "a party process outlived the job"

    resumed = launch_local(spec, str(TINY), OVERRIDES, SEED, out_dir=out, timeout_s=600,
                           work_dir=tmp_path / "work2", resume=True)  # fmt: skip
    assert all(r["resumed_from_step"] >= kill_step - 1 for r in resumed.values())
    assert len({r["resumed_from_step"] for r in resumed.values()}) == 1
    assert len(resumed["bob"]["losses"]) == STEPS
    reference = finetune_in_simulator(
        spec, seeds=PrivateSeeds(SEED), out_dir=tmp_path / "sim", progress=False
    )
    tuned = load_theta(resumed["alice"]["tuned_params"]["path"])
    assert relative_gap(tuned, load_theta(reference["tuned_params"]["path"])) < 1e-3


@pytest.mark.cluster
@pytest.mark.slow  # a tiny 3-party job to its first checkpoint, then the hang: about 2 min
@pytest.mark.timeout(600)
def test_a_stopped_party_is_named_by_both_others_within_the_heartbeat_bound(tmp_path):
    """SIGSTOP one party (a hung host): its ports still accept connections, so before the
    heartbeat the others waited for an RPC timeout (82 s) and blamed each other. Now both
    name the frozen party, within the heartbeat bound, and no process is left."""
    victim = random.choice(["alice", "bob", "carol"])
    print(f"stop test: SIGSTOP {victim} after its checkpoint of step 1")
    overrides = [*OVERRIDES, "tuning.steps=200"]
    spec, out = load_spec(TINY, overrides), tmp_path / "run"
    thread, procs, failure = _launch_until_checkpoint(spec, overrides, out, tmp_path / "work", victim, 1, 400)  # fmt: skip
    pid = next(pp.pid for pp in procs if pp.party == victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    thread.join(timeout=120)
    assert not thread.is_alive()
    waited = time.monotonic() - stopped_at
    print(f"the others stopped {waited:.1f} s after the SIGSTOP")
    assert waited < 45  # heartbeat bound 15 s, plus the launcher's stop of the frozen one
    for pp in (pp for pp in procs if pp.party != victim):
        assert pp.proc.returncode == LOST_PEER_EXIT, (pp.party, pp.proc.returncode)
        log = pp.log_path.read_text(errors="replace")
        assert f"lost party {victim}" in log and "stopped or hung" in log, log[-2000:]
    assert failure and f"lost party {victim}" in str(failure[0]).splitlines()[0]
    assert all(_gone(pp.pid) for pp in procs), "a party process outlived the job"


def _party_pids(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the launch's work dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")  # fmt: skip
            except OSError:
                continue
            if marker in cmdline and "party_main" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_sigterm_to_cluster_launch_stops_every_party_and_removes_the_seed_file(tmp_path):
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "secfwt_jax.runtime.cli", "cluster", "launch", str(TINY),
           "--private-seed", "3", "--set", "tuning.steps=200", "--out", str(tmp_path / "run")]  # fmt: skip
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TMPDIR": str(tmp)})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        work = None
        while time.monotonic() < deadline and launcher.poll() is None:
            dirs = list(tmp.glob("secfwt-cluster-*"))
            if dirs and len(_party_pids(str(dirs[0]))) >= 3 and list(dirs[0].glob("*.log")):
                work = dirs[0]
                break
            time.sleep(0.2)
        assert work is not None, "the parties never started"
        seed_file = work / "alice.private_seed"
        assert seed_file.exists()
        time.sleep(5)  # into the run
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        leftover = _party_pids(str(tmp)) if launcher.returncode != 143 else []
        for pid in leftover:  # the bug this test guards against: do not leave them running
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("secfwt: stopped by SIGTERM; cleaned up"), last
    assert not seed_file.exists()
    assert _party_pids(str(work)) == [], "a party outlived the launcher"
    assert not (tmp_path / "run" / "alice" / "tuned_params.npz").exists()
