"""Upstream connections: TCP to the destination (the part a mode may change), TLS on top.

An `Upstream` is one connection to a destination with its `server_connect` /
`server_disconnect` events. How the TCP connection is made is the only mode-specific
step (`Connector`); everything above it is shared.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING

from dumpproxy.certs import is_ip
from dumpproxy.hostfilter import join_host_port
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream

if TYPE_CHECKING:
    import h11

    from dumpproxy.proxy import ClientConn


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
    """Regular mode's connector: a direct TCP connection."""
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


class Upstream:
    """One connection to a destination, owned by a client connection."""

    def __init__(self, cc: ClientConn, sock: SocketStream, host: str, port: int):
        self.cc = cc
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

    @classmethod
    async def open(cls, cc: ClientConn, host: str, port: int,
                   tls: tuple[str, tuple[str, ...]] | None = None) -> Upstream:
        """Connect (and with tls=(server name, ALPN offer), handshake) to host:port."""
        started = time.monotonic()
        sock = await cc.proxy.connect(host, port)
        up = cls(cc, sock, host, port)
        cc.proxy.emit(
            "server_connect",
            {
                "address": up.address,
                "ip": up.ip,
                "connect_ms": round((time.monotonic() - started) * 1000, 3),
            },
            cc,
        )
        cc.upstreams.add(up)
        if tls is not None:
            try:
                await up.start_tls(*tls)
            except UpstreamError:
                up.close()
                raise
        return up

    async def start_tls(self, server_name: str, alpn: tuple[str, ...]) -> TLSStream:
        """Client-side TLS with the destination, verified per configuration."""
        # No session resumption: reading SSLObject.session leaks its session on
        # CPython 3.11 / OpenSSL 3.0 (some 6 KiB per call), a leak per connection.
        proxy = self.cc.proxy
        ctx = proxy.upstream_context(alpn)
        try:
            tls = await TLSStream.handshake(
                self.sock, ctx, server_side=False, server_hostname=server_name,
                timeout=proxy.cfg.connect_timeout,
            )
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            raise UpstreamError("server_tls", describe_tls_error(e, server_name)) from None
        self.tls = tls
        self.stream = tls
        sni = None if is_ip(server_name) else server_name  # no SNI is sent for IPs
        self.cc.proxy.emit(
            "tls", {"side": "server", "address": self.address, "sni": sni, **tls.info()}, self.cc
        )
        return tls

    @property
    def reusable(self) -> bool:
        return not self.closed and not self.sock.at_eof

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        self.cc.upstreams.discard(self)
        self.cc.proxy.emit(
            "server_disconnect",
            {
                "address": self.address,
                "ip": self.ip,
                "bytes_sent": self.sock.bytes_out,
                "bytes_received": self.sock.bytes_in,
            },
            self.cc,
        )
