"""Upstream connections: how a connection to a destination is made, and TLS on top.

A `Connector` is the one piece a mode swaps: it makes the TCP connection (directly in
regular mode) and holds the verified client-side TLS contexts. An `Upstream` is one open
connection to a destination, with its `server_connect` / `server_disconnect` / `tls`
events written through the emit function of the client connection that owns it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Callable

import h11

from dumpproxy.addresses import is_ip, join_host_port
from dumpproxy.config import Config
from dumpproxy.schema import ServerConnect, ServerDisconnect
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream

Emit = Callable[[str, dict], object]
TLSRequest = tuple[str, tuple[str, ...]]  # (server name, ALPN offer)


class UpstreamError(Exception):
    """Connecting to (or talking TLS with) the destination failed.

    `status` is the HTTP status the client gets (502, or 504 for timeouts) and `stage`
    the error event's stage.
    """

    def __init__(self, stage: str, message: str, status: int = 502):
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.status = status


async def tcp_connect(host: str, port: int, timeout: float) -> SocketStream:
    """A direct TCP connection, failures as UpstreamError."""
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(SocketStream, host, port), timeout
        )
    except asyncio.TimeoutError:
        raise UpstreamError(
            "server_connect", f"connecting to {join_host_port(host, port)} timed out", 504
        ) from None
    except socket.gaierror as e:
        raise UpstreamError(
            "server_connect", f"DNS lookup for {host} failed: {e.strerror}"
        ) from None
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
        raise UpstreamError(
            "server_connect", f"cannot connect to {join_host_port(host, port)}: {reason}"
        ) from None
    return proto


def describe_tls_error(e: BaseException, host: str) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"upstream certificate for {host} is not trusted: {e.verify_message}; "
            "add its CA with --upstream-ca FILE or disable checks with -k/--ssl-insecure"
        )
    if isinstance(e, StreamTimeout):
        return f"TLS handshake with {host} timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake with {host} failed: {e.reason or e}"
    return f"TLS handshake with {host} failed: {e or type(e).__name__}"


def make_upstream_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if cfg.upstream_ca:
        ctx.load_verify_locations(cafile=cfg.upstream_ca)
    if cfg.ssl_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Connector:
    """Regular mode's way to a destination: a direct TCP connection, verified TLS.

    A mode that reaches destinations differently (through another proxy) replaces `tcp`.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}

    async def tcp(self, host: str, port: int) -> SocketStream:
        return await tcp_connect(host, port, self.cfg.connect_timeout)

    def tls_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = make_upstream_context(self.cfg)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._contexts[alpn] = ctx
        return ctx

    async def open(self, emit: Emit, host: str, port: int, tls: TLSRequest | None = None,
                   on_close: Callable[[Upstream], None] | None = None) -> Upstream:
        """Connect (and with tls, handshake) to host:port; events go through emit."""
        started = time.monotonic()
        sock = await self.tcp(host, port)
        up = Upstream(self, emit, sock, host, port, on_close)
        emit("server_connect", ServerConnect(
            address=up.address, ip=up.ip,
            connect_ms=round((time.monotonic() - started) * 1000, 3)))
        if tls is not None:
            try:
                await up.start_tls(*tls)
            except UpstreamError:
                up.close()
                raise
        return up


class Upstream:
    """One connection to a destination, owned by a client connection."""

    def __init__(self, connector: Connector, emit: Emit, sock: SocketStream, host: str,
                 port: int, on_close: Callable[[Upstream], None] | None = None):
        self.connector = connector
        self.emit = emit
        self.sock = sock
        self.stream: Stream = sock
        self.host = host
        self.port = port
        self.address = join_host_port(host, port)
        peer = sock.peername or ("?", port)
        self.ip_host: str = peer[0]
        self.ip = join_host_port(peer[0], peer[1])
        self.tls: TLSStream | None = None
        self.h: h11.Connection | None = None  # the HTTP/1 client state, set by the bridge
        self.closed = False
        self._on_close = on_close

    async def start_tls(self, server_name: str, alpn: tuple[str, ...]) -> TLSStream:
        """Client-side TLS with the destination, verified per configuration."""
        # No session resumption: reading SSLObject.session leaks its session on
        # CPython 3.11 / OpenSSL 3.0 (some 6 KiB per call), a leak per connection.
        ctx = self.connector.tls_context(alpn)
        try:
            tls = await TLSStream.handshake(
                self.sock, ctx, server_side=False, server_hostname=server_name,
                timeout=self.connector.cfg.connect_timeout,
            )
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            raise UpstreamError("server_tls", describe_tls_error(e, server_name)) from None
        self.tls = tls
        self.stream = tls
        sni = None if is_ip(server_name) else server_name  # no SNI is sent for IPs
        self.emit("tls", tls.event("server", self.address, sni))
        return tls

    @property
    def reusable(self) -> bool:
        return not self.closed and not self.sock.at_eof

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tls is not None and self.sock.ended is None:
            self.tls.write_eof()  # close_notify before FIN: an orderly TLS close
        self.sock.close()
        if self._on_close is not None:
            self._on_close(self)
        self.emit("server_disconnect", ServerDisconnect(
            address=self.address, ip=self.ip, bytes_sent=self.sock.bytes_out,
            bytes_received=self.sock.bytes_in, how=self.sock.ended or "proxy_closed"))
