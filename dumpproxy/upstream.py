"""Upstream connections: how a connection to a destination is made, and TLS on top.

A `Connector` is the one piece a mode swaps: it makes the TCP connection (directly in
regular mode) and holds the verified client-side TLS contexts. An `Upstream` is one open
connection to a destination, with its `server_connect` / `server_disconnect` / `tls`
events written through the emit function of the client connection that owns it.

Each upstream has one owner, which alone closes it (`Context` in `context`): whoever uses
an upstream hands it back with `release()` when done, saying whether it could carry
another exchange.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from dumpproxy.addresses import is_ip, join_host_port
from dumpproxy.config import Config
from dumpproxy.http1_wire import Wire
from dumpproxy.schema import ServerConnect, ServerDisconnect
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream

Emit = Callable[[str, dict], object]
TLSRequest = tuple[str, tuple[str, ...]]  # (server name, ALPN offer)
Release = Callable[["Upstream", bool], None]  # the owner's: (connection, reusable)


class UpstreamError(Exception):
    """Connecting to (or talking TLS with) the destination failed.

    `status` is the HTTP status the client gets (502, or 504 for timeouts) and `stage`
    the error event's stage.
    """

    def __init__(self, stage: str, message: str, status: int = 502, kind: str | None = None):
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.status = status
        self.kind = kind  # "dns", "refused", "unreachable", "timeout" (SOCKS5 reply codes)


OUT_OF_DESCRIPTORS = ("dumpproxy ran out of file descriptors (too many open connections); "
                      "raise the limit with `ulimit -n`")


_ERRNO_KINDS = {errno.ECONNREFUSED: "refused", errno.ENETUNREACH: "net_unreachable",
                errno.EHOSTUNREACH: "unreachable", errno.ETIMEDOUT: "timeout"}


@dataclass
class Dialed:
    """What a Connector's `dial` made: the socket, the stream to talk on (TLS to an
    upstream proxy), the proxy it went through, and how plain HTTP is sent on it."""

    sock: SocketStream
    stream: Stream | None = None  # default: the socket itself
    via: str | None = None  # the upstream proxy's URL (upstream mode)
    absolute_form: bool = False  # plain HTTP in absolute form (to an upstream proxy)
    proxy_headers: tuple[tuple[bytes, bytes], ...] = ()  # added to such requests


async def tcp_connect(host: str, port: int, timeout: float,
                      sock: socket.socket | None = None) -> SocketStream:
    """A direct TCP connection, failures as UpstreamError. sock: a socket of the caller's
    (bound already, non-blocking) to connect, with host an IP address."""
    loop = asyncio.get_running_loop()
    try:
        if sock is None:
            connecting = loop.create_connection(SocketStream, host, port)
        else:
            connecting = _connect_socket(sock, host, port)
        _, proto = await asyncio.wait_for(connecting, timeout)
    except asyncio.TimeoutError:
        raise UpstreamError(
            "server_connect", f"connecting to {join_host_port(host, port)} timed out", 504,
            "timeout",
        ) from None
    except socket.gaierror as e:
        raise UpstreamError(
            "server_connect", f"DNS lookup for {host} failed: {e.strerror}", kind="dns"
        ) from None
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):  # ours, not the destination's fault
            raise UpstreamError("server_connect", OUT_OF_DESCRIPTORS, 503) from None
        reason = os.strerror(e.errno) if e.errno else (e.strerror or str(e))
        raise UpstreamError(
            "server_connect", f"cannot connect to {join_host_port(host, port)}: {reason}",
            kind=_ERRNO_KINDS.get(e.errno or 0),
        ) from None
    return proto


async def _connect_socket(sock: socket.socket, host: str, port: int):
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (host, port))
        return await loop.create_connection(SocketStream, sock=sock)
    except BaseException:
        sock.close()
        raise


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

    A mode that reaches destinations differently replaces `dial` (through another proxy)
    or `tcp` (from a socket of its own), and may follow its connections' end (`closed`).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._contexts: dict[tuple[str, ...], ssl.SSLContext] = {}

    async def tcp(self, host: str, port: int) -> SocketStream:
        return await tcp_connect(host, port, self.cfg.connect_timeout)

    async def dial(self, host: str, port: int, forward: bool = False) -> Dialed:
        """The connection to host:port; forward: it will carry plain HTTP requests (an
        upstream proxy takes them in absolute form instead of a CONNECT)."""
        return Dialed(await self.tcp(host, port))

    def tls_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self._contexts.get(alpn)
        if ctx is None:
            ctx = make_upstream_context(self.cfg)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._contexts[alpn] = ctx
        return ctx

    def closed(self, up: Upstream) -> None:
        """One of this connector's connections was closed."""

    async def open(self, emit: Emit, server: int, host: str, port: int, owner: Release,
                   tls: TLSRequest | None = None, forward: bool = False) -> Upstream:
        """Connect (and with tls, handshake) to host:port, as upstream connection number
        `server`; events go through emit. The owner is told when it is released."""
        started = time.monotonic()
        dialed = await self.dial(host, port, forward)
        up = Upstream(self, emit, server, dialed.sock, host, port, owner, dialed, forward)
        fields = ServerConnect(server=server, address=up.address, ip=up.ip,
                               connect_ms=round((time.monotonic() - started) * 1000, 3))
        if dialed.via is not None:
            fields["via"] = dialed.via
        emit("server_connect", fields)
        if tls is not None:
            try:
                await up.start_tls(*tls)
            except UpstreamError:
                up.close()  # never handed out: still ours to close
                raise
        return up


class Upstream:
    """One connection to a destination, owned by a client connection."""

    def __init__(self, connector: Connector, emit: Emit, server: int, sock: SocketStream,
                 host: str, port: int, owner: Release, dialed: Dialed | None = None,
                 forward: bool = False):
        self.connector = connector
        self.emit = emit
        self.id = server  #: `server` in events: its number in this run
        self.forward = forward  # carries absolute-form plain HTTP (to an upstream proxy)
        self.sock = sock
        self.stream: Stream = dialed.stream if dialed and dialed.stream else sock
        self._base = self.stream  # what TLS with the destination runs over
        self.host = host
        self.port = port
        self.address = join_host_port(host, port)
        peer = sock.peername or ("?", port)
        self.via = dialed.via if dialed else None  #: the upstream proxy, if any
        # The resolved peer is a candidate only when it is the destination (SPEC §3).
        self.ip_host: str | None = None if self.via else peer[0]
        self.ip = join_host_port(peer[0], peer[1])
        self.absolute_form = bool(dialed and dialed.absolute_form)
        self.proxy_headers = list(dialed.proxy_headers) if dialed else []
        self.tls: TLSStream | None = None
        self.tls_request: TLSRequest | None = None  # the server name and ALPN of its TLS
        self.wire: Wire | None = None  # the HTTP/1 client state, set by the bridge
        self.closed = False
        self._owner: Release | None = owner  # None once released, until adopted

    async def start_tls(self, server_name: str, alpn: tuple[str, ...]) -> TLSStream:
        """Client-side TLS with the destination, verified per configuration."""
        # No session resumption: reading SSLObject.session leaks its session on
        # CPython 3.11 / OpenSSL 3.0 (some 6 KiB per call), a leak per connection.
        ctx = self.connector.tls_context(alpn)
        try:
            tls = await TLSStream.handshake(
                self._base, ctx, server_side=False, server_hostname=server_name,
                timeout=self.connector.cfg.connect_timeout,
            )
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            raise UpstreamError("server_tls", describe_tls_error(e, server_name)) from None
        self.tls = tls
        self.tls_request = (server_name, alpn)
        self.stream = tls
        sni = None if is_ip(server_name) else server_name  # no SNI is sent for IPs
        fields = tls.event("server", self.address, sni)
        fields["server"] = self.id
        self.emit("tls", fields)
        return tls

    @property
    def reusable(self) -> bool:
        """It may carry another request (its origin has not closed it)."""
        return not self.closed and not self.sock.at_eof

    @property
    def healthy(self) -> bool:
        """Between exchanges and untouched by the origin: it may serve another client
        (nothing unread on it, no unfinished message)."""
        return (self.reusable and self.sock.ended is None and not self.sock.buffered
                and (self.tls is None or (not self.tls.buffered  # and not HTTP/2's
                                          and self.tls.ssl.selected_alpn_protocol() != "h2"))
                and (self.wire is None or self.wire.idle))

    def adopt(self, emit: Emit, owner: Release) -> None:
        """A pooled connection taken by another client connection: its events and its
        release go there now."""
        self.emit = emit
        self._owner = owner

    def release(self, reusable: bool = False) -> None:
        """Done with this connection: back to its owner (reusable: it could carry another
        exchange). The user must not touch it afterwards; releasing again does nothing."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner(self, reusable)

    def close(self) -> None:
        """Close the connection: for its owner only (everyone else releases it)."""
        if self.closed:
            return
        self.closed = True
        if self.tls is not None and self.sock.ended is None:
            self.tls.write_eof()  # close_notify before FIN: an orderly TLS close
        self.connector.closed(self)
        self.sock.close()
        self.emit("server_disconnect", ServerDisconnect(
            server=self.id, address=self.address, ip=self.ip, bytes_sent=self.sock.bytes_out,
            bytes_received=self.sock.bytes_in, how=self.sock.ended or "proxy_closed"))
