"""Typed SecretFlow PRODUCTION-mode cluster config for loopback and real deployments.

secretflow 1.11 can only host an SPU device in PRODUCTION mode (one OS process per party,
``ray_mode=False``): SIMULATION needs the unavailable ``secretflow_fl`` package and DEBUG
cannot host SPU. A PRODUCTION cluster needs two *different* address books that must agree
across every process: SecretFlow's cross-silo (gRPC) addresses passed to ``sf.init``, and
SPU's brpc link addresses in the SPU ``cluster_def``. Getting one port or one party name
wrong makes the parties hang waiting for each other instead of failing, so this module
validates everything up front and derives both dicts from one frozen config.

The exact shapes produced (secretflow 1.11.0b1, spu 0.9.3b0)::

    sf.init(address='local', ray_mode=False, cluster_config={
        'parties': {'alice': {'address': '127.0.0.1:P', 'listen_addr': '127.0.0.1:P'}, ...},
        'self_party': 'alice'})

    sf.SPU({'nodes': [{'party': 'alice', 'address': '127.0.0.1:Q', 'listen_address': ''}, ...],
            'runtime_config': {'protocol': 'ABY3', 'field': 'FM64', ...}})

``runtime_config`` is parsed by ``json_format.Parse`` into ``spu.RuntimeConfig``, so enum
values are given by name (``'ABY3'``, ``'FM64'``). SecretFlow sorts ``nodes`` by party name
and uses the sorted index as the SPU rank, so node order here does not matter.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from secfwt_jax.run.spec import FIELDS, WORLD_SIZE
from secfwt_jax.runtime.sf_import import defer_component
from secfwt_jax.strict_yaml import DuplicateKeyError, load_json, load_yaml

defer_component()  # every party process imports this module before SecretFlow (8.6 s saved)

__all__ = [
    "FIELDS",
    "PARTY_WORK_DIR_ENV",
    "WORLD_SIZE",
    "ClusterConfig",
    "free_ports",
    "load_cluster_config",
    "loopback_cluster",
    "check_beaver_source",
    "check_own_ports",
    "SpuOnDemand",
    "describe_link_failure",
    "set_cross_silo_timeout",
    "sf_party_session",
]


# The launcher points party processes' side files (SPU logs) at its work dir through this.
PARTY_WORK_DIR_ENV = "SECFWT_PARTY_WORK_DIR"
_SF_NO_EXIT = "SF_UT_DO_NOT_EXIT_ENV_FLAG"
TLS_KEYS = ("ca_cert", "cert", "key")
_PARTY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _fail(name: str, why: str) -> ValueError:
    """One-line error that names the offending field, so a bad YAML is fixed in one go."""
    return ValueError(f"ClusterConfig.{name}: {why}")


@dataclass(frozen=True)
class ClusterConfig:
    """Addresses and SPU protocol for one SecretFlow PRODUCTION cluster.

    Every party process builds the same ``ClusterConfig`` and asks it for its own
    ``sf_cluster_config(self_party)``; the SPU ``cluster_def`` is identical for all parties.
    Every party is also an SPU node (the compute parties are the data/model owners), which is
    the deployment the design card describes.

    ``sf_ports`` are SecretFlow cross-silo (gRPC) ports, ``spu_ports`` the SPU brpc link
    ports; all ports across both maps must be distinct because on loopback they share a host.
    ``listen_host`` (e.g. ``"0.0.0.0"``) makes each party bind there while peers still dial
    ``host``; ``None`` means listen on ``host``. ``spu_runtime_extra`` is merged into SPU's
    ``runtime_config`` (e.g. ``{"fxp_fraction_bits": 18, "enable_pphlo_profile": True}``).
    """

    parties: tuple[str, ...]
    sf_ports: Mapping[str, int]
    spu_ports: Mapping[str, int]
    host: str = "127.0.0.1"
    protocol: str = "ABY3"
    field: str = "FM64"
    listen_host: str | None = None
    spu_runtime_extra: Mapping[str, Any] = dc_field(default_factory=dict)
    allow_insecure_beaver: bool = False
    tls: Mapping[str, str] | None = None
    #: Where a party dials a peer when links go through relays (`runtime.link_shaper`):
    #: {party: {peer: port}} on ``host``; a pair not named dials the peer's own port.
    sf_dial: Mapping[str, Mapping[str, int]] = dc_field(default_factory=dict)
    spu_dial: Mapping[str, Mapping[str, int]] = dc_field(default_factory=dict)
    #: The slowest link the deployment plans for (bits/s) and the base of the SPU link
    #: timeouts (s): `spu_link_timeouts` scales them with a run's largest message.
    slowest_link_bps: float = 10e6
    link_timeout_s: float = 120.0
    #: The base of SecretFlow's cross-silo RPC timeout (s); `cross_silo_timeout_ms` scales it.
    rpc_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        # Normalise containers (YAML/JSON give lists and plain dicts) before validating.
        object.__setattr__(self, "parties", tuple(self.parties))
        object.__setattr__(self, "sf_ports", dict(self.sf_ports))
        object.__setattr__(self, "spu_ports", dict(self.spu_ports))
        object.__setattr__(self, "spu_runtime_extra", dict(self.spu_runtime_extra))
        for name in ("sf_dial", "spu_dial"):
            object.__setattr__(self, name, {p: dict(m) for p, m in dict(getattr(self, name)).items()})  # fmt: skip
        self._validate()

    def _validate(self) -> None:
        if not self.parties:
            raise _fail("parties", "must name at least one party")
        for p in self.parties:
            if not isinstance(p, str) or not _PARTY_RE.match(p):
                raise _fail("parties", f"bad party name {p!r} (letters, digits, '_', '-')")
        if len(set(self.parties)) != len(self.parties):
            raise _fail("parties", f"duplicate party names in {list(self.parties)}")
        if self.protocol not in WORLD_SIZE:
            raise _fail("protocol", f"{self.protocol!r} not one of {sorted(WORLD_SIZE)}")
        n = len(self.parties)
        if n != WORLD_SIZE[self.protocol]:
            raise _fail(
                "parties", f"{self.protocol} needs {WORLD_SIZE[self.protocol]} parties, got {n}"
            )
        if self.field not in FIELDS:
            raise _fail("field", f"{self.field!r} not one of {list(FIELDS)}")
        if not isinstance(self.host, str) or not self.host:
            raise _fail("host", "must be a non-empty host name or IP")
        if self.listen_host is not None and (
            not isinstance(self.listen_host, str) or not self.listen_host
        ):
            raise _fail("listen_host", "must be None or a non-empty host name or IP")
        seen: dict[int, str] = {}
        for name in ("sf_ports", "spu_ports"):
            ports: dict[str, int] = getattr(self, name)
            if set(ports) != set(self.parties):
                missing = sorted(set(self.parties) - set(ports))
                extra = sorted(set(ports) - set(self.parties))
                raise _fail(name, f"keys must equal parties (missing {missing}, unknown {extra})")
            for party in self.parties:
                port = ports[party]
                if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                    raise _fail(name, f"{party}: port {port!r} not an int in 1..65535")
                where = f"{name}[{party}]"
                if port in seen:
                    raise _fail(name, f"duplicate port {port} ({seen[port]} and {where})")
                seen[port] = where
        if self.tls is not None:
            if not isinstance(self.tls, Mapping) or set(self.tls) != set(TLS_KEYS):
                raise _fail("tls", f"must map exactly {list(TLS_KEYS)} to file paths ('{{party}}' is replaced by the party's name)")  # fmt: skip
            for key in TLS_KEYS:
                if not isinstance(self.tls[key], str) or not self.tls[key]:
                    raise _fail(f"tls.{key}", "must be a file path")
            object.__setattr__(self, "tls", dict(self.tls))
        for name in ("sf_dial", "spu_dial"):
            for party, peers in getattr(self, name).items():
                if party not in self.parties or not set(peers) <= set(self.parties) - {party}:
                    raise _fail(name, f"{party}: {sorted(peers)} must be peers of a party in {list(self.parties)}")  # fmt: skip
                for peer, port in peers.items():
                    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                        raise _fail(name, f"{party}->{peer}: port {port!r} not an int in 1..65535")
        for name in ("slowest_link_bps", "link_timeout_s", "rpc_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < float("inf")
            ):
                raise _fail(name, f"must be a positive number, got {value!r}")
        reserved = {"protocol", "field"} & set(self.spu_runtime_extra)
        if reserved:
            raise _fail("spu_runtime_extra", f"must not set {sorted(reserved)}; use the fields")

    def tls_paths(self, self_party: str) -> dict[str, str] | None:
        """This party's CA, certificate and key paths (None without TLS); one line naming
        the field and the file when one is missing."""
        if self.tls is None:
            return None
        paths = {k: self.tls[k].replace("{party}", self_party) for k in TLS_KEYS}
        for key, path in paths.items():
            if not Path(path).is_file():
                raise _fail(f"tls.{key}", f"{path} not found (party {self_party})")
        return paths

    # ---------------------------------------------------------------- secretflow dicts
    def _check_party(self, self_party: str) -> None:
        if self_party not in self.parties:
            raise ValueError(f"self_party {self_party!r} not in parties {list(self.parties)}")

    def sf_cluster_config(self, self_party: str) -> dict[str, Any]:
        """The ``cluster_config`` dict for ``sf.init(..., ray_mode=False)`` in ``self_party``."""
        self._check_party(self_party)
        listen = self.listen_host or self.host
        dial = self.sf_dial.get(self_party, {})
        return {
            "parties": {
                p: {
                    "address": f"{self.host}:{dial.get(p, self.sf_ports[p])}",
                    "listen_addr": f"{listen}:{self.sf_ports[p]}",
                }
                for p in self.parties
            },
            "self_party": self_party,
        }

    def spu_peer_ports(self, self_party: str) -> dict[int, str]:
        """The SPU ports `self_party` dials, and the peer behind each."""
        dial = self.spu_dial.get(self_party, {})
        return {dial.get(p, self.spu_ports[p]): p for p in self.parties if p != self_party}

    def spu_link_timeouts(self, largest_message_bytes: int):
        """SPU link timeouts for a run whose largest message is bounded by
        ``largest_message_bytes`` (`compile.network.link_timeouts`)."""
        from secfwt_jax.compile.network import link_timeouts

        return link_timeouts(largest_message_bytes, self.slowest_link_bps, self.link_timeout_s)

    def cross_silo_timeout_ms(self, burst_bytes: int) -> int:
        """SecretFlow's cross-silo RPC timeout when ``burst_bytes`` may be queued on one
        link at once: ``rpc_timeout_s`` plus three times their time on the slowest link."""
        from secfwt_jax.compile.network import scaled_timeout_ms

        return scaled_timeout_ms(burst_bytes, self.slowest_link_bps, self.rpc_timeout_s)

    def spu_runtime_config(self) -> dict[str, Any]:
        """SPU ``runtime_config`` in JSON form (enum names), as ``json_format.Parse`` wants."""
        return {"protocol": self.protocol, "field": self.field, **self.spu_runtime_extra}

    def spu_cluster_def(
        self, self_party: str | None = None, spu_listen: tuple[str, int] | None = None
    ) -> dict[str, Any]:
        """The ``cluster_def`` for ``sf.SPU``; a fresh dict each call (``sf.SPU`` mutates it).

        ``self_party`` only matters with ``listen_host`` or ``spu_listen``: that node gets
        a ``listen_address`` so it binds there while peers dial ``host``. With TLS,
        ``spu_listen`` is the loopback address behind this party's `tls_front` (SPU's own
        server does not enforce TLS; the front on the public port does).
        """
        if self_party is not None:
            self._check_party(self_party)
        nodes = []
        for p in self.parties:
            listen = ""
            if spu_listen is not None and p == self_party:
                listen = f"{spu_listen[0]}:{spu_listen[1]}"
            elif self.listen_host and p == self_party:
                listen = f"{self.listen_host}:{self.spu_ports[p]}"
            port = self.spu_dial.get(self_party, {}).get(p, self.spu_ports[p]) if self_party else self.spu_ports[p]  # fmt: skip
            node = {"party": p, "address": f"{self.host}:{port}", "listen_address": listen}
            if self.tls is not None and p == self_party:  # SPU's brpc link reads its own node's
                paths = self.tls_paths(p)
                opts = {"certificate_path": paths["cert"], "private_key_path": paths["key"],
                        "ca_file_path": paths["ca_cert"], "verify_depth": 1}  # fmt: skip
                node["tls_opts"] = {"server_ssl_opts": dict(opts), "client_ssl_opts": dict(opts)}
            nodes.append(node)
        return {"nodes": nodes, "runtime_config": self.spu_runtime_config()}

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict; round-trips through ``from_dict``."""
        return {
            "parties": list(self.parties),
            "sf_ports": dict(self.sf_ports),
            "spu_ports": dict(self.spu_ports),
            "host": self.host,
            "protocol": self.protocol,
            "field": self.field,
            "listen_host": self.listen_host,
            "spu_runtime_extra": dict(self.spu_runtime_extra),
            "allow_insecure_beaver": self.allow_insecure_beaver,
            "tls": None if self.tls is None else dict(self.tls),
            "sf_dial": {p: dict(m) for p, m in self.sf_dial.items()},
            "spu_dial": {p: dict(m) for p, m in self.spu_dial.items()},
            "slowest_link_bps": self.slowest_link_bps,
            "link_timeout_s": self.link_timeout_s,
            "rpc_timeout_s": self.rpc_timeout_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterConfig:
        """Build from a plain dict, rejecting unknown keys so typos do not pass silently."""
        if not isinstance(d, Mapping):
            raise ValueError(f"ClusterConfig: expected a mapping, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise _fail(unknown[0], f"unknown key (known: {sorted(known)})")
        for req in ("parties", "sf_ports", "spu_ports"):
            if req not in d:
                raise _fail(req, "missing required key")
        if isinstance(d["parties"], str) or not isinstance(d["parties"], list | tuple):
            raise _fail("parties", "must be a list of party names")
        for name in ("sf_ports", "spu_ports", "spu_runtime_extra", "tls"):
            if name == "tls" and d.get("tls") is None:
                continue
            if name in d and not isinstance(d[name], Mapping):
                raise _fail(name, "must be a mapping")
        return cls(**d)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Pick ``n`` distinct free TCP ports on ``host`` chosen by the OS right now.

    All sockets stay bound until every port is picked, so the ports are distinct. A port can
    still be taken by someone else between here and the party binding it (unavoidable
    TOCTOU); callers that retry should pick fresh ports.
    """
    if n < 0:
        raise ValueError(f"free_ports: n must be >= 0, got {n}")
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    return ports


def loopback_cluster(
    parties: tuple[str, ...] | list[str] = ("alice", "bob", "carol"),
    protocol: str = "ABY3",
    field: str = "FM64",
    **kwargs: Any,
) -> ClusterConfig:
    """A validated cluster on 127.0.0.1 with fresh free ports (2 per party: sf + SPU)."""
    parties = tuple(parties)
    ports = free_ports(2 * len(parties))
    return ClusterConfig(
        parties=parties,
        sf_ports=dict(zip(parties, ports[: len(parties)], strict=True)),
        spu_ports=dict(zip(parties, ports[len(parties) :], strict=True)),
        protocol=protocol,
        field=field,
        **kwargs,
    )


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Load and validate a cluster config from ``.json``, ``.yaml`` or ``.yml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cluster file {path}: cannot read it ({error.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = load_yaml(text)
        except DuplicateKeyError as error:
            raise ValueError(f"cluster file {path}: {error}") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"cluster file {path}: malformed YAML{where} ({getattr(error, 'problem', None) or error})") from None  # fmt: skip
    else:
        try:
            data = load_json(text)
        except DuplicateKeyError as error:
            raise ValueError(f"cluster file {path}: {error}") from None
        except ValueError as error:
            raise ValueError(f"cluster file {path}: malformed JSON ({error})") from None
    return ClusterConfig.from_dict(data)


def check_beaver_source(cluster: ClusterConfig) -> None:
    """Refuse SEMI2K with the TrustedFirstParty Beaver source (party 0 then knows every
    triple) unless the cluster explicitly allows it; every cluster session starts here."""
    beaver = cluster.spu_runtime_extra.get("beaver_type", "TrustedFirstParty")
    if cluster.protocol == "SEMI2K" and beaver == "TrustedFirstParty" and not cluster.allow_insecure_beaver:  # fmt: skip
        raise ValueError(
            "ClusterConfig.spu_runtime_extra.beaver_type: SEMI2K with TrustedFirstParty is "
            "insecure (party 0 knows every Beaver triple); use TrustedThirdParty or "
            "MultiParty, or set allow_insecure_beaver: true (tests only)"
        )


def check_own_ports(cluster: ClusterConfig, self_party: str) -> None:
    """Refuse, in one line, a port of this party that another process holds (gRPC binds
    with SO_REUSEPORT, so SecretFlow would otherwise share it and hang until a timeout)."""
    host = cluster.listen_host or cluster.host
    for name in ("sf_ports", "spu_ports"):
        port = getattr(cluster, name)[self_party]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind((host, port))
            except OSError as error:
                raise _fail(f"{name}[{self_party}]", f"port {port} on {host} is not free ({error.strerror})") from None  # fmt: skip


def _fix_secretflow_tls_channels() -> None:
    """secretflow 1.11.0b1 builds its cross-silo CLIENT channels from gRPC SERVER
    credentials (`GrpcProxy._init_channel`), which gRPC refuses with a TypeError, so TLS
    never worked there. Replace that one method by the same code with client credentials:
    the CA verifies the peer's server certificate, and our certificate and key answer the
    peer's request for a client certificate (mutual TLS). Idempotent."""
    import grpc
    from secretflow.distributed.fed.proxy.grpc import grpc as sf_grpc

    if getattr(sf_grpc.GrpcProxy._init_channel, "_secfwt_fixed", False):
        return

    def _init_channel(self) -> None:
        for dest_party, dest_addr in self._addresses.items():
            if self._tls_config:
                read = lambda key: Path(self._tls_config[key]).read_bytes()  # noqa: E731
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=read("ca_cert"), private_key=read("key"), certificate_chain=read("cert")
                )  # fmt: skip
                channel = grpc.secure_channel(dest_addr, credentials, options=self._grpc_options)
            else:
                channel = grpc.insecure_channel(dest_addr, options=self._grpc_options)
            self._stubs[dest_party] = sf_grpc.fed_pb2_grpc.SfFedProxyStub(channel)

    _init_channel._secfwt_fixed = True  # type: ignore[attr-defined]
    sf_grpc.GrpcProxy._init_channel = _init_channel


def _bind_secretflow_to_listen_addr() -> None:
    """secretflow 1.11.0b1's cross-silo server binds ``[::]:port`` (every interface),
    whatever host ``listen_addr`` names, so a party configured for loopback would accept
    connections from the network. Replace `GrpcProxy._start_server` by the same server
    bound to ``listen_addr`` itself (``listen_host`` "0.0.0.0" still binds every IPv4
    interface, as asked). Idempotent."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from secretflow.distributed.fed.proxy.grpc import grpc as sf_grpc

    if getattr(sf_grpc.GrpcProxy._start_server, "_secfwt_fixed", False):
        return

    def _start_server(self) -> None:
        server = grpc.server(ThreadPoolExecutor(max_workers=8), options=self._grpc_options)
        sf_grpc.fed_pb2_grpc.add_SfFedProxyServicer_to_server(self, server)
        if self._tls_config:
            server.add_secure_port(self._listen_addr, sf_grpc._load_cert_config(self._tls_config))
        else:
            server.add_insecure_port(self._listen_addr)
        server.start()
        self._server = server

    _start_server._secfwt_fixed = True  # type: ignore[attr-defined]
    sf_grpc.GrpcProxy._start_server = _start_server


_SPU_RECV_TIMEOUT = re.compile(r"Get data timeout, key=\S*?:(\d+)->(\d+)")
_SF_SEND_FAILED = re.compile(r"\[([\w-]+)\] -- Failed to send seq id \d+ to ([\w-]+)")
_SPU_SEND_FAILED = re.compile(r"SendImpl error .*?addr=[^:\s]+:(\d+)[^)]*\):\s*([^'\n]*)")
_GRPC_STATUS = re.compile(r"status = StatusCode\.(\w+)")


def describe_link_failure(log_text: str, parties: tuple[str, ...] | list[str], sender: str | None = None, peer_ports: dict[int, str] | None = None) -> str | None:  # fmt: skip
    """One line naming the link that failed, from a party's log, or None. SPU names links
    by rank (the sorted party names): "Get data timeout, key=root:P2P-2:1->0" is the
    receiver 0 waiting past its receive timeout for the sender 1. A send that failed after
    SPU's retries names only the port it dialled: `peer_ports` maps the ports `sender`
    dials to its peers."""
    ranks = sorted(parties)
    if sender and peer_ports and (m := _SPU_SEND_FAILED.search(log_text)):
        peer = peer_ports.get(int(m.group(1)), f"port {m.group(1)}")
        why = m.group(2).strip().rstrip("'")
        return f"SPU link {sender}->{peer}: sending failed after SPU's retries ({why})"
    if m := _SPU_RECV_TIMEOUT.search(log_text):
        src, dst = (ranks[int(i)] if int(i) < len(ranks) else i for i in m.groups())
        return f"SPU link {src}->{dst}: no message within the receive timeout (yacl key {m.group(0).split('key=')[1]})"  # fmt: skip
    if m := _SF_SEND_FAILED.search(log_text):
        status = _GRPC_STATUS.search(log_text[m.end() :])
        why = f" ({status.group(1)})" if status else ""
        return f"SecretFlow link {m.group(1)}->{m.group(2)}: a message was not delivered{why}"
    return None


def set_cross_silo_timeout(ms: int) -> None:
    """SecretFlow's cross-silo RPC timeout from now on, in this party (each send reads it
    from the proxy's config: secretflow/distributed/fed/proxy/grpc/grpc.py `send`)."""
    from secretflow.distributed.fed.global_context import get_global_context

    get_global_context()._proxy._proxy_config.timeout_in_ms = int(ms)


class SpuOnDemand:
    """The cluster's SPU device, opened by the first `device()` call with the link options
    given to it; the same device after that."""

    def __init__(self, open_device):
        self._open, self._device = open_device, None

    def device(self, link_desc: Mapping[str, Any] | None = None):
        if self._device is None:
            self._device = self._open(link_desc)
        return self._device


@contextlib.contextmanager
def sf_party_session(
    cluster: ClusterConfig,
    self_party: str,
    *,
    job_name: str = "secfwt",
    logging_level: str = "warning",
    rpc_timeout_ms: int | None = None,
    spu_log_path: str | Path | None = None,
    watch_peers: bool = True,
    connect_timeout_s: float = 60.0,
    spu_link_desc: Mapping[str, Any] | None = None,
    open_spu: bool = True,
) -> Iterator[Any]:
    """``sf.init`` this process as ``self_party`` and yield the cluster's ``sf.SPU`` device.

    Always shuts SecretFlow down on exit: with a barrier on success (so no party exits
    before its peers received what they need), without one on error (a barrier would wait
    for a peer that may be gone). ``job_name`` must match across parties.

    With ``watch_peers`` a `runtime.liveness.PeerWatch` stops this process with one line
    naming the peer when a peer is unreachable for ``connect_timeout_s`` at the start or
    stops answering later; the watch ends before the shutdown barrier of a finished run.

    ``spu_link_desc`` goes to the SPU device's links (timeouts: `spu_link_timeouts`).
    With ``open_spu=False`` the session yields a `SpuOnDemand` instead, which opens the
    SPU device (and its links) when first asked, with link options known by then: every
    party must ask at the same point of the same program.

    SPU's spdlog otherwise writes ``spu.log`` into the working directory, shared by every
    party on the host; by default it goes to ``spu-<party>.log`` in ``$SECFWT_PARTY_WORK_DIR``
    (set by the launcher) or the working directory.
    """
    check_beaver_source(cluster)  # before anything is started or sent
    check_own_ports(cluster, self_party)
    tls = cluster.tls_paths(self_party)
    import secretflow as sf
    import spu.libspu.logging as spu_logging

    if spu_log_path is None:
        base = Path(os.environ.get(PARTY_WORK_DIR_ENV) or ".")
        spu_log_path = base / f"spu-{self_party}.log"
    log_options = spu_logging.LogOptions()
    log_options.system_log_path = str(spu_log_path)

    _bind_secretflow_to_listen_addr()
    if tls is not None:
        _fix_secretflow_tls_channels()
    watch = None
    fronts = contextlib.ExitStack()  # what this session serves until it ends
    if watch_peers:
        from secfwt_jax.runtime.liveness import HeartbeatResponder, PeerWatch

        own = (cluster.listen_host or cluster.host, cluster.sf_ports[self_party])
        fronts.enter_context(HeartbeatResponder(*own))  # UDP, on the SecretFlow port number
        peers = {p: (cluster.host, cluster.sf_ports[p]) for p in cluster.parties if p != self_party}
        watch = PeerWatch(self_party, peers, connect_timeout_s=connect_timeout_s, tls=tls).start()
    try:
        sf.init(
            address="local",
            cluster_config=cluster.sf_cluster_config(self_party),
            ray_mode=False,
            job_name=job_name,
            logging_level=logging_level,
            cross_silo_comm_options={
                "timeout_in_ms": rpc_timeout_ms or int(1000 * cluster.rpc_timeout_s)
            },
            tls_config=tls,
        )
    except BaseException:
        if watch is not None:
            watch.stop()
        fronts.close()
        raise
    try:
        spu_listen = None
        if tls is not None:  # SPU's port speaks mutual TLS only through our front
            from secfwt_jax.runtime.tls_front import spu_front

            public = (cluster.listen_host or cluster.host, cluster.spu_ports[self_party])
            spu_listen = fronts.enter_context(spu_front(public, tls))

        def spu_device(link_desc: Mapping[str, Any] | None):
            return sf.SPU(cluster.spu_cluster_def(self_party, spu_listen), link_desc=dict(link_desc or {}) or None, log_options=log_options)  # fmt: skip

        yield spu_device(spu_link_desc) if open_spu else SpuOnDemand(spu_device)
    except BaseException:
        fronts.close()
        if watch is not None:
            watch.stop()
        # sf.shutdown(on_error=True) ends in os._exit(1) (secretflow/distributed/fed/api.py)
        # unless SF_UT_DO_NOT_EXIT_ENV_FLAG is set, which would swallow our traceback and
        # kill a notebook kernel. Set it just for the call so the error propagates.
        prev = os.environ.get(_SF_NO_EXIT)
        os.environ[_SF_NO_EXIT] = "1"
        try:
            sf.shutdown(barrier_on_shutdown=False, on_error=True)
        finally:
            if prev is None:
                os.environ.pop(_SF_NO_EXIT, None)
            else:
                os.environ[_SF_NO_EXIT] = prev
        raise
    if watch is not None:
        watch.stop()  # peers that finished may now leave
    try:
        sf.shutdown()
    finally:
        fronts.close()
