"""SecretFlow PRODUCTION-mode cluster on loopback: config validation, a 3-party SPU run,
and the launcher's failure handling (a dead or hung party must never leave processes behind).

The ``cluster`` tests start real party processes; a 3-party ABY3 run takes about 10-12 s on
a 2-core machine, almost all of it importing secretflow/jax in each party.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from cluster_jobs import JOBS_ENV, smoke_plaintext

from secfwt_jax.runtime.cluster import (
    ClusterConfig,
    free_ports,
    load_cluster_config,
    loopback_cluster,
)
from secfwt_jax.runtime.launcher import PartyFailedError, PartyProcess, launch_parties

PARTIES = ("alice", "bob", "carol")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pid reused by someone else's group: not ours
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _assert_all_gone(procs: list[PartyProcess]) -> None:
    assert procs, "launcher started no processes"
    for pp in procs:
        assert pp.proc.returncode is not None, f"{pp.party} was not reaped"
        assert not _pid_alive(pp.pid), f"{pp.party} pid {pp.pid} still alive"
        assert not _group_alive(pp.pid), f"{pp.party} process group {pp.pid} still alive"


# ----------------------------------------------------------------------------- config


def _good(**over) -> dict:
    d = {
        "parties": list(PARTIES),
        "sf_ports": {"alice": 20001, "bob": 20002, "carol": 20003},
        "spu_ports": {"alice": 20011, "bob": 20012, "carol": 20013},
        "protocol": "ABY3",
        "field": "FM64",
    }
    d.update(over)
    return d


def test_dict_shapes_match_secretflow_1_11():
    c = ClusterConfig.from_dict(_good())
    sfc = c.sf_cluster_config("bob")
    assert sfc == {
        "parties": {
            "alice": {"address": "127.0.0.1:20001", "listen_addr": "127.0.0.1:20001"},
            "bob": {"address": "127.0.0.1:20002", "listen_addr": "127.0.0.1:20002"},
            "carol": {"address": "127.0.0.1:20003", "listen_addr": "127.0.0.1:20003"},
        },
        "self_party": "bob",
    }
    cd = c.spu_cluster_def("bob")
    assert cd["runtime_config"] == {"protocol": "ABY3", "field": "FM64"}
    assert [n["party"] for n in cd["nodes"]] == list(PARTIES)
    assert cd["nodes"][2] == {"party": "carol", "address": "127.0.0.1:20013", "listen_address": ""}
    # sf.SPU mutates (sorts) the dict it gets: each call must hand out a fresh one.
    assert c.spu_cluster_def() is not c.spu_cluster_def()
    # runtime_config must parse into spu.RuntimeConfig exactly as sf.SPU parses it.
    import spu
    from google.protobuf import json_format

    conf = json_format.Parse(json.dumps(cd["runtime_config"]), spu.RuntimeConfig())
    assert conf.protocol == spu.ProtocolKind.ABY3 and conf.field == spu.FieldType.FM64


def test_listen_host_applies_to_self_only():
    c = ClusterConfig.from_dict(_good(listen_host="0.0.0.0"))
    sfc = c.sf_cluster_config("alice")["parties"]
    assert sfc["alice"] == {"address": "127.0.0.1:20001", "listen_addr": "0.0.0.0:20001"}
    nodes = {n["party"]: n for n in c.spu_cluster_def("alice")["nodes"]}
    assert nodes["alice"]["listen_address"] == "0.0.0.0:20011"
    assert nodes["bob"]["listen_address"] == ""


def test_the_cross_silo_server_binds_the_configured_host_only():
    # secretflow's own server binds [::] (every interface) whatever listen_addr says.
    import ipaddress

    import psutil
    from secretflow.distributed.fed.proxy.grpc.grpc import GrpcProxy

    from secfwt_jax.runtime.cluster import _bind_secretflow_to_listen_addr

    _bind_secretflow_to_listen_addr()
    (port,) = free_ports(1)
    proxy = GrpcProxy({"alice": f"127.0.0.1:{port}"}, "alice", "job", None, {})
    proxy._start_server()
    try:
        bound = {c.laddr.ip for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
    finally:
        proxy._server.stop(None)
    ips = [ipaddress.ip_address(ip) for ip in bound]
    assert ips and all((getattr(ip, "ipv4_mapped", None) or ip).is_loopback for ip in ips), bound


def test_free_ports_and_loopback_cluster():
    ports = free_ports(6)
    assert len(set(ports)) == 6 and all(0 < p < 65536 for p in ports)
    c = loopback_cluster(("p0", "p1"), "SEMI2K")
    assert len(set(c.sf_ports.values()) | set(c.spu_ports.values())) == 4


def test_yaml_and_json_round_trip(tmp_path):
    yaml = pytest.importorskip("yaml")
    c = loopback_cluster()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(c.to_dict()))
    (tmp_path / "c.json").write_text(json.dumps(c.to_dict()))
    assert load_cluster_config(tmp_path / "c.yaml") == c
    assert load_cluster_config(tmp_path / "c.json") == c


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"spu_ports": {"alice": 20011, "bob": 20012, "carol": 20001}}, "spu_ports"),
        ({"sf_ports": {"alice": 20001, "bob": 20001, "carol": 20003}}, "sf_ports"),
        ({"parties": ["alice", "bob"]}, "parties"),  # ABY3 needs 3 (port keys checked later)
        ({"protocol": "CHEETAH"}, "parties"),  # CHEETAH needs 2
        ({"protocol": "SPDZ"}, "protocol"),
        ({"field": "FM63"}, "field"),
        ({"parties": ["alice", "alice", "carol"]}, "parties"),
        ({"spu_ports": {"alice": 20011, "bob": 20012}}, "spu_ports"),
        ({"sf_ports": {"alice": 20001, "bob": 70000, "carol": 20003}}, "sf_ports"),
        ({"prtocol": "ABY3"}, "prtocol"),
        ({"slowest_link_bps": 0}, "slowest_link_bps"),
        ({"link_timeout_s": "soon"}, "link_timeout_s"),
    ],
)
def test_bad_config_one_line_value_error_naming_field(override, field, tmp_path):
    with pytest.raises(ValueError) as ei:
        ClusterConfig.from_dict(_good(**override))
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"ClusterConfig.{field}:"), msg
    # Same through the file loader.
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(_good(**override)))
    with pytest.raises(ValueError, match=rf"^ClusterConfig\.{field}:"):
        load_cluster_config(p)


# ----------------------------------------------------------------------------- cluster


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_three_party_spu_inputs_from_two_pyus():
    cluster = loopback_cluster(PARTIES, "ABY3")
    procs: list[PartyProcess] = []
    t0 = time.monotonic()
    results = launch_parties(
        cluster,
        "cluster_jobs:smoke_job",
        {"n": 4, "seed": 3, "x_party": "alice", "y_party": "bob"},
        timeout_s=90,
        env=JOBS_ENV,
        started=procs,
    )
    elapsed = time.monotonic() - t0
    assert set(results) == set(PARTIES)
    values = {p: np.asarray(r["value"]) for p, r in results.items()}
    for p in PARTIES:
        np.testing.assert_array_equal(values[p], values["alice"], err_msg=p)
    # FM64 keeps 18 fraction bits; a 4-term matmul plus sum leaves ~1e-5 error.
    np.testing.assert_allclose(values["alice"], smoke_plaintext(4, 3), atol=1e-3)
    _assert_all_gone(procs)
    print(f"3-party ABY3 loopback run: {elapsed:.1f}s wall; per party: {results}")


@pytest.mark.cluster
@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", ["before_init", "in_session"])
def test_failed_party_raises_promptly_and_kills_everyone(stage, tmp_path):
    cluster = loopback_cluster(PARTIES, "ABY3")
    procs: list[PartyProcess] = []
    t0 = time.monotonic()
    with pytest.raises(PartyFailedError) as ei:
        launch_parties(
            cluster,
            "cluster_jobs:failing_job",
            {"fail_party": "bob", "stage": stage},
            timeout_s=45,
            env=JOBS_ENV,
            started=procs,
            work_dir=tmp_path,  # failed runs keep their logs; keep them out of /tmp
        )
    elapsed = time.monotonic() - t0
    assert ei.value.party == "bob"
    assert "'bob'" in str(ei.value)
    assert "injected failure in party bob" in str(ei.value)  # its stderr tail is included
    # alice and carol would block (sf.init barrier / sf.reveal) for a minute or more; 30.8 s
    # was seen on a machine at load 24, so the bound leaves room for a loaded CI host.
    assert elapsed < 50, f"failure took {elapsed:.1f}s to surface"
    assert {pp.party for pp in procs} == set(PARTIES)
    _assert_all_gone(procs)


@pytest.mark.cluster
@pytest.mark.timeout(30)
def test_timeout_kills_every_party(tmp_path):
    cluster = loopback_cluster(PARTIES, "ABY3")
    procs: list[PartyProcess] = []
    t0 = time.monotonic()
    with pytest.raises(PartyFailedError, match="timed out"):
        launch_parties(
            cluster,
            "cluster_jobs:sleep_job",
            {"seconds": 600},
            timeout_s=3,
            env=JOBS_ENV,
            started=procs,
            work_dir=tmp_path,
        )
    assert time.monotonic() - t0 < 15
    _assert_all_gone(procs)


def test_a_failed_link_is_named_by_its_parties_from_the_log():
    from secfwt_jax.runtime.cluster import describe_link_failure

    spu = "secretflow.distributed.fed.exception.FedLocalError: what: \n\t[external/yacl/yacl/link/transport/channel.cc:430] Get data timeout, key=root:P2P-2:1->0"  # fmt: skip
    assert describe_link_failure(spu, ["carol", "alice", "bob"]) == "SPU link bob->alice: no message within the receive timeout (yacl key root:P2P-2:1->0)"  # fmt: skip
    sf = "2026-12-06 12:47:47.526 ERROR global_context.py:186 [bob] -- Failed to send seq id 91 to alice\nTraceback ...\n\tstatus = StatusCode.DEADLINE_EXCEEDED\n"  # fmt: skip
    assert describe_link_failure(sf, PARTIES) == "SecretFlow link bob->alice: a message was not delivered (DEADLINE_EXCEEDED)"  # fmt: skip
    assert describe_link_failure("ValueError: data.k: must be >= 1", PARTIES) is None
    send = "2026-12-06 13:53:44.145 [error] [channel.cc:Proc:104] SendImpl error [external/yacl/yacl/link/transport/interconnection_link.cc:56] cntl ErrorCode '104', http status code '0', response header '', response body '', error msg '[E104]Fail to read from Socket{id=0fd=17 addr=127.0.0.1:41523:48884} (0x0x7f34ec593dc0): Connection reset by peer'"  # fmt: skip
    cluster = ClusterConfig.from_dict(_good(spu_dial={"carol": {"alice": 41523, "bob": 41524}}))
    assert cluster.spu_peer_ports("carol") == {41523: "alice", 41524: "bob"}
    assert cluster.spu_peer_ports("alice") == {20012: "bob", 20013: "carol"}
    assert describe_link_failure(send, PARTIES, "carol", cluster.spu_peer_ports("carol")) == "SPU link carol->alice: sending failed after SPU's retries (Connection reset by peer)"  # fmt: skip
