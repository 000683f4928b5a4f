"""Mutual TLS in front of SPU's link port, which SPU's own TLS does not enforce.

spu 0.9.3's brpc link, given the cluster's certificates (`tls_opts`), encrypts what it
sends and asks peers for a certificate, but its brpc server sniffs each new connection
and also serves one that speaks no TLS: a plain HTTP POST to
``/org.interconnection.link.ReceiverService/Push`` with no certificate is dispatched as a
message from a party (brpc's ``ServerOptions.force_ssl`` would refuse it; yacl never sets
it, and the option is not reachable from Python).

So with the cluster file's ``tls`` section each party puts a `MutualTlsFront` on its
public SPU port. The front completes a TLS handshake that requires a client certificate
the cluster's CA signed (TLS 1.2 or newer) before a single byte reaches SPU, then relays
the connection to SPU's server, which listens on a loopback port of its own
(`internal_spu_address`). A peer with no certificate, a certificate another CA signed, or
no TLS at all is dropped at the handshake. SPU's own client still dials the peers'
fronts with TLS and verifies their certificates against the CA, so every hop between
hosts is mutually authenticated and encrypted.

Trust: the loopback hop between the front and SPU is plain TCP inside the party's host,
which is the party's own trust domain (the same as a sidecar proxy); a host shared with
untrusted local users is out of scope, as it is for the party's key file.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator, Mapping

#: Seconds a new connection may take to finish the TLS handshake.
HANDSHAKE_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


def server_context(tls: Mapping[str, str]) -> ssl.SSLContext:
    """A server context that demands a client certificate signed by ``tls["ca_cert"]``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=tls["ca_cert"])
    context.load_cert_chain(tls["cert"], tls["key"])
    return context


class MutualTlsFront:
    """Accept mutual-TLS connections on ``listen`` and relay each to ``upstream``.

    ``listen`` and ``upstream`` are (host, port); ``listen`` port 0 picks a free one
    (`address`). The relay runs on an asyncio loop in a daemon thread: asyncio's TLS works
    on memory buffers in one thread, so reading and writing one connection at the same time
    is safe (two threads on one blocking `ssl.SSLSocket` are not, and stalled SPU's
    traffic). `close` stops accepting and drops open relays.
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], tls: Mapping[str, str]):
        self._context = server_context(tls)
        self._upstream = upstream
        self._sock = socket.create_server(listen)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)  # fmt: skip
        self.accepted = 0  # connections that passed the handshake

    def start(self) -> MutualTlsFront:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._serve_forever(), self._loop)
        started.result(timeout=30)
        return self

    async def _serve_forever(self) -> None:
        # asyncio completes the handshake before `_relay` runs; a peer that fails it (no TLS,
        # no certificate, another CA's) is dropped without a callback. (`start_tls` inside
        # the callback would lose a ClientHello that the stream had already buffered.)
        self._server = await asyncio.start_server(
            self._relay, sock=self._sock, ssl=self._context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S, limit=_CHUNK,
        )  # fmt: skip

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            relays = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)  # no "never retrieved"

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._sock.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A peer passed the handshake (a client certificate the CA signed): relay it."""
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream, limit=_CHUNK)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer), return_exceptions=True)  # fmt: skip
        for w in (writer, up_writer):
            w.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until `reader` ends, then end `writer`'s direction: half-close a TCP side, close
    a TLS side (TLS streams have no half-close in asyncio)."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (OSError, ssl.SSLError, asyncio.CancelledError):
        writer.close()


def internal_spu_address() -> tuple[str, int]:
    """A free loopback (host, port) for SPU's own server behind the front."""
    from secfwt_jax.runtime.cluster import free_ports

    return ("127.0.0.1", free_ports(1)[0])


@contextlib.contextmanager
def spu_front(listen: tuple[str, int], tls: Mapping[str, str]) -> Iterator[tuple[str, int]]:
    """Start a front on ``listen`` and yield the loopback address SPU must listen on."""
    internal = internal_spu_address()
    front = MutualTlsFront(listen, internal, tls).start()
    try:
        yield internal
    finally:
        front.close()


__all__ = ["HANDSHAKE_TIMEOUT_S", "MutualTlsFront", "internal_spu_address", "server_context", "spu_front"]  # fmt: skip
