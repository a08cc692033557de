"""The ways in: one `Mode` per listener, each learning the destination its own way.

A mode only decides how the destination is learned (its `serve`) and how connections to
it are made (its `Connector`); once both are known every mode hands the client to the
same path: `tunnel.Tunnel` (peek, decide, relay or intercept, then the HTTP bridges) or,
for the explicit proxy's plain HTTP, `http1_server.serve_http1`.

- regular: explicit HTTP proxy (absolute-form plain HTTP, CONNECT), also over TLS to the
  proxy itself ("secure web proxy": TLS detected from the first byte).
- upstream:URL: the same, every connection made through another proxy (`viaproxy`).
- reverse:URL: every client is served as if dumpproxy were URL's server.
- socks5: RFC 1928 CONNECT (wire format in `socks5`).
- transparent: the destination is the redirected connection's original one.
"""

from __future__ import annotations

import socket
import struct
import time

from dumpproxy import socks5
from dumpproxy.addresses import BadHost, authority, check_host, join_host_port
from dumpproxy.clienttls import HTTP1_ALPN, ClientTLS, usable_sni
from dumpproxy.config import Config
from dumpproxy.context import Context
from dumpproxy.explicit import serve_explicit
from dumpproxy.modespec import ModeSpec
from dumpproxy.peek import peek_client
from dumpproxy.streams import SocketStream, Stream, StreamTimeout
from dumpproxy.tunnel import Destination, HttpAnswer, serve
from dumpproxy.upstream import Connector, Upstream, UpstreamError, tcp_connect
from dumpproxy.viaproxy import ProxyConnector

TLS_HANDSHAKE = 0x16


class Mode:
    """One listener's way in. `serve` runs once per accepted client."""

    def __init__(self, spec: ModeSpec, cfg: Config):
        self.spec = spec
        self.cfg = cfg
        self.connector: Connector | None = None  # None: the shared direct connector
        self.address = ""  #: the listening address, host:port (set once bound)
        self.sockname: tuple | None = None  #: the listening socket's address
        self.sock: socket.socket | None = None  #: a listening socket made elsewhere (--isolate)

    async def serve(self, ctx: Context) -> None:
        raise NotImplementedError


class RegularMode(Mode):
    """Explicit HTTP proxy; a client that starts with TLS gets the proxy over TLS."""

    async def serve(self, ctx: Context) -> None:
        client = ctx.stream
        try:
            first = await client.read(ctx.cfg.head_timeout)
        except StreamTimeout:
            client.mark("idle_timeout")  # as any client quiet for the head timeout
            return
        except ConnectionError:
            return
        if not first:
            return
        client.unread(first)
        if first[0] != TLS_HANDSHAKE:
            dest = await serve_explicit(ctx, client)
            if dest is not None:
                await serve(ctx, client, dest)
            return
        # TLS to the proxy itself ("secure web proxy"), the proxy protocol inside
        _, peek = await peek_client(client, ctx.cfg.peek_timeout)
        if not usable_sni(ctx, peek.sni, self.address):
            return
        local = client.transport.get_extra_info("sockname") if client.transport else None
        name = peek.sni or (local[0] if local else self.spec.listen_host or "127.0.0.1")
        tls = ClientTLS(ctx, client, name, self.address, peek.sni, "secure web proxy: ")
        stream = await tls.handshake((HTTP1_ALPN,) if HTTP1_ALPN in peek.alpn else ())
        if stream is None:
            await tls.failed()
            return
        tls.serving()
        try:
            dest = await serve_explicit(ctx, stream)
            if dest is not None:
                await serve(ctx, stream, dest)
        finally:
            tls.finish()
        await tls.judge_silence()


class UpstreamMode(RegularMode):
    """Like regular, every connection made through the upstream proxy of the URL."""

    def __init__(self, spec: ModeSpec, cfg: Config):
        super().__init__(spec, cfg)
        self.connector = ProxyConnector(cfg, spec)


class Socks5Mode(Mode):
    """SOCKS5 (RFC 1928) CONNECT; user/pass (RFC 1929) when --proxyauth is set."""

    async def serve(self, ctx: Context) -> None:
        client = ctx.stream
        reader = _Reader(client, ctx.cfg.head_timeout)
        try:
            await self._handshake(ctx, client, reader)
        except socks5.SocksError as e:
            if e.reply is not None:
                _write(client, socks5.reply(e.reply))
            ctx.error("socks5", str(e))
            return
        except _Quiet:
            return
        except StreamTimeout:
            client.mark("idle_timeout")
            ctx.error("socks5", f"no complete SOCKS5 handshake within "
                                f"{ctx.cfg.head_timeout:g} s")
            return
        except ConnectionError as e:
            if reader.buf or reader.started:
                ctx.error("socks5", f"client left during the SOCKS5 handshake: {e}")
            return

    async def _handshake(self, ctx: Context, client: SocketStream, reader: _Reader) -> None:
        auth = ctx.services.auth
        (methods,) = await reader.parse(socks5.parse_greeting)
        method = socks5.choose_method(methods, auth is not None)
        client.write(socks5.method_reply(method))
        if method == socks5.NO_ACCEPTABLE:
            if auth is not None:
                ctx.error("auth", "SOCKS5 client offers no username/password authentication "
                                  "(--proxyauth is set)")
            else:
                ctx.error("socks5", "SOCKS5 client offers no acceptable method (without "
                                    "--proxyauth only 'no authentication' is supported)")
            return
        if auth is not None:
            user, password = await reader.parse(socks5.parse_user_pass)
            ok = auth.check_user_pass(user, password)
            client.write(socks5.auth_reply(ok))
            if not ok:
                ctx.error("auth", "SOCKS5 authentication failed for user "
                                  f"{user.decode('latin-1')!r}")
                return
        (req,) = await reader.parse(socks5.parse_request)
        address = join_host_port(req.host, req.port)
        try:
            check_host(req.host)
        except BadHost as e:
            raise socks5.SocksError(f"SOCKS5 request for {e}", socks5.HOST_UNREACHABLE) from None
        if req.command != socks5.CONNECT:
            name = socks5.COMMAND_NAMES.get(req.command, f"command {req.command:#04x}")
            client.write(socks5.reply(socks5.COMMAND_NOT_SUPPORTED))
            ctx.error("socks5", f"SOCKS5 {name} to {address} is not supported (only CONNECT)",
                      address=address)
            return
        client.unread(reader.buf)
        await serve(ctx, client, Destination(req.host, req.port, SocksAnswer(client)))


class SocksAnswer:
    """SOCKS5's reply: success with the upstream socket's address, or the failure's code."""

    def __init__(self, client: Stream):
        self.client = client

    def connected(self, up: Upstream | None) -> bool:
        bound = up.sock.transport.get_extra_info("sockname") \
            if up is not None and up.sock.transport else None
        try:
            self.client.write(socks5.reply(socks5.SUCCEEDED, *(bound[:2] if bound else ())))
        except ConnectionError:
            return False
        return True

    async def failed(self, err: UpstreamError, dest: Destination) -> bool:
        _write(self.client, socks5.reply(_REPLY_FOR.get(err.kind or "",
                                                        socks5.GENERAL_FAILURE)))
        return False

    def blocked(self, why: str) -> None:
        _write(self.client, socks5.reply(socks5.NOT_ALLOWED))


_REPLY_FOR = {
    "dns": socks5.HOST_UNREACHABLE,
    "unreachable": socks5.HOST_UNREACHABLE,
    "timeout": socks5.HOST_UNREACHABLE,
    "net_unreachable": socks5.NETWORK_UNREACHABLE,
    "refused": socks5.CONNECTION_REFUSED,
}


def _write(stream: Stream, data: bytes) -> None:
    try:
        stream.write(data)
    except ConnectionError:
        pass


class _Quiet(Exception):
    """The client left before saying anything: no error."""


class _Reader:
    """Bytes from the client for the pure parsers, within one deadline."""

    def __init__(self, stream: Stream, timeout: float):
        self.stream = stream
        self.buf = b""
        self.started = False  # some message was complete already
        self.deadline = time.monotonic() + timeout

    async def parse(self, parser) -> tuple:
        """The parser's values (all but the byte count), reading until it has them."""
        while True:
            result = parser(self.buf)
            if result is not None:
                self.buf = self.buf[result[-1]:]
                self.started = True
                return tuple(result[:-1])
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout()
            chunk = await self.stream.read(left)
            if not chunk:
                if not self.buf and not self.started:
                    raise _Quiet()
                raise ConnectionResetError("connection closed")
            self.buf += chunk


class ReverseMode(Mode):
    """Every client is served as if dumpproxy were the target's server: the destination
    is the target (its scheme and name, whatever the client speaks), every request gets
    the target's Host, and the client's Host is no decision candidate."""

    def __init__(self, spec: ModeSpec, cfg: Config):
        super().__init__(spec, cfg)
        host, port, scheme = spec.host or "", spec.port or 0, spec.scheme or "http"
        self.target = (host, port, scheme, authority(scheme, host, port).encode())

    async def serve(self, ctx: Context) -> None:
        host, port, scheme, authority = self.target
        await serve(ctx, ctx.stream, Destination(
            host, port, HttpAnswer(ctx, ctx.stream, scheme, authority), scheme=scheme,
            authority=authority, host_header=False, lazy=True))


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination a redirected connection was addressed to (netfilter NAT)."""
    if sock.family == socket.AF_INET6:
        peer = sock.getpeername()[0]
        if not peer.startswith("::ffff:"):
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            return parse_sockaddr(raw)
    return parse_sockaddr(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16))


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """A struct sockaddr_in / sockaddr_in6 as (ip, port)."""
    family = struct.unpack("=H", raw[:2])[0]
    (port,) = struct.unpack("!H", raw[2:4])
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


class TransparentConnector(Connector):
    """Direct connections whose local ports are known before they connect, so that one
    redirected back to our own listener (a loop) is recognised when it arrives."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ports: set[int] = set()  #: local ports of our upstream sockets

    def closed(self, up: Upstream) -> None:
        local = up.sock.transport.get_extra_info("sockname") if up.sock.transport else None
        if local:
            self.ports.discard(local[1])

    async def tcp(self, host: str, port: int) -> SocketStream:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError as e:
            sock.close()
            raise UpstreamError("server_connect", f"cannot open a socket to "
                                f"{join_host_port(host, port)}: {e.strerror or e}") from None
        local_port = sock.getsockname()[1]
        self.ports.add(local_port)
        try:
            return await tcp_connect(host, port, self.cfg.connect_timeout, sock)
        except BaseException:
            self.ports.discard(local_port)
            raise


class TransparentMode(Mode):
    """Traffic redirected by iptables/nftables: the destination is the original one."""

    def __init__(self, spec: ModeSpec, cfg: Config):
        super().__init__(spec, cfg)
        self.connector = self.loop_guard = TransparentConnector(cfg)

    async def serve(self, ctx: Context) -> None:
        client = ctx.stream
        sock = client.transport.get_extra_info("socket") if client.transport else None
        if sock is None:
            return
        try:
            host, port = original_dst(sock)
        except OSError as e:
            ctx.error("transparent", "no original destination for this connection "
                      f"({e.strerror or e}): transparent mode serves only connections "
                      "redirected to it by iptables/nftables (REDIRECT/TPROXY)")
            return
        dst = join_host_port(host, port)
        local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
        if (host, port) == tuple(local) or (host, port) == (self.sockname or ())[:2]:
            ctx.error("transparent", f"refused: the original destination {dst} is "
                      f"dumpproxy's own listener {self.address} (a client connected to it "
                      "directly; transparent mode needs redirected traffic)", address=dst)
            return
        if peer[1] in self.loop_guard.ports:
            ctx.error("transparent", f"refused a redirect loop: this connection to {dst} is "
                      "dumpproxy's own upstream connection, redirected back to it; exclude "
                      "dumpproxy's traffic from the redirect rule (e.g. iptables -m owner "
                      "! --uid-owner USER)", address=dst)
            return
        await serve(ctx, client, Destination(host, port))


MODE_CLASSES: dict[str, type[Mode]] = {
    "regular": RegularMode,
    "upstream": UpstreamMode,
    "reverse": ReverseMode,
    "socks5": Socks5Mode,
    "transparent": TransparentMode,
}


def make_mode(spec: ModeSpec, cfg: Config) -> Mode:
    return MODE_CLASSES[spec.kind](spec, cfg)

