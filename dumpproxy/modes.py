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
import ssl
import struct
import time

from dumpproxy import socks5
from dumpproxy.addresses import BadHost, check_host, join_host_port
from dumpproxy.clienthello import Peek
from dumpproxy.config import Config
from dumpproxy.context import Context
from dumpproxy.flows import DEFAULT_PORTS
from dumpproxy.hostfilter import candidates
from dumpproxy.http1_server import Target, serve_http1
from dumpproxy.modespec import ModeSpec
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream
from dumpproxy.tunnel import (
    H2_ALPN,
    HTTP1_ALPN,
    Tunnel,
    answer_with_error,
    client_tls_message,
    leaf_context,
    peek_first_bytes,
    serve_connect,
    usable_sni,
)
from dumpproxy.upstream import Connector, UpstreamError, tcp_connect
from dumpproxy.viaproxy import ProxyConnector

TLS_HANDSHAKE = 0x16


async def peek_client(stream: Stream, timeout: float) -> tuple[bytes, Peek]:
    """The client's first bytes within timeout; they stay unread in the stream."""
    return await peek_first_bytes(stream, time.monotonic() + timeout)


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
        stream = await self._client_stream(ctx)
        if stream is None:
            return
        connect = await serve_http1(ctx, stream, None)
        if connect is not None:
            await serve_connect(ctx, stream, connect)  # type: ignore[arg-type]

    async def _client_stream(self, ctx: Context) -> Stream | None:
        """The client's stream: the socket, or TLS on it when the first byte says so."""
        client = ctx.stream
        try:
            first = await client.read(ctx.cfg.head_timeout)
        except (StreamTimeout, ConnectionError):
            return None
        if not first:
            return None
        client.unread(first)
        if first[0] != TLS_HANDSHAKE:
            return client
        _, peek = await peek_client(client, ctx.cfg.peek_timeout)
        if not usable_sni(ctx, peek.sni, self.address):
            return None
        local = client.transport.get_extra_info("sockname") if client.transport else None
        name = peek.sni or (local[0] if local else self.spec.listen_host or "127.0.0.1")
        certs = ctx.services.certs
        alpn = (HTTP1_ALPN,) if HTTP1_ALPN in peek.alpn else ()
        server_ctx = leaf_context(ctx, name, alpn, self.address)
        if server_ctx is None:
            return None
        try:
            tls = await TLSStream.handshake(client, server_ctx,
                                            server_side=True, timeout=ctx.cfg.peek_timeout)
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            ctx.error("client_tls", "secure web proxy: " + client_tls_message(
                e, certs.ca.cert_path), address=self.address)
            return None
        ctx.emit("tls", tls.event("client", self.address, peek.sni))
        return tls


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
        try:
            up = await ctx.open_upstream(req.host, req.port)
        except UpstreamError as e:
            code = _REPLY_FOR.get(e.kind or "", socks5.GENERAL_FAILURE)
            _write(client, socks5.reply(code))
            ctx.error(e.stage, e.message, address=address)  # type: ignore[arg-type]
            return
        try:
            bound = up.sock.transport.get_extra_info("sockname") if up.sock.transport else None
            client.write(socks5.reply(socks5.SUCCEEDED, *(bound[:2] if bound else ())))
            client.unread(reader.buf)
            await Tunnel(ctx, client, up, req.host, req.port).run()
        finally:
            up.close()


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
    """Every client is served as if dumpproxy were the target's server."""

    async def serve(self, ctx: Context) -> None:
        spec = self.spec
        host, port = spec.host or "", spec.port or 0
        try:
            up = await ctx.open_upstream(host, port)
        except UpstreamError as e:
            ctx.error(e.stage, e.message, address=spec.address)  # type: ignore[arg-type]
            _, peek = await peek_client(ctx.stream, ctx.cfg.peek_timeout)
            if peek.kind == "http":
                await answer_with_error(ctx, ctx.stream, e)
            return
        try:
            await ReverseTunnel(ctx, ctx.stream, up, spec).run()
        finally:
            up.close()


class ReverseTunnel(Tunnel):
    """A reverse-mode connection: plain or TLS from the client, to the fixed target."""

    def __init__(self, ctx: Context, client: SocketStream, up, spec: ModeSpec):
        super().__init__(ctx, client, up, spec.host or "", spec.port or 0)
        self.scheme = spec.scheme or "http"
        host = spec.host or ""
        shown = f"[{host}]" if ":" in host else host
        self.authority = (shown if DEFAULT_PORTS[self.scheme] == self.port
                          else join_host_port(host, self.port)).encode()

    def candidates(self, peek: Peek) -> list[str]:
        # The Host header is the client's idea of the target's name, rewritten anyway.
        return candidates(self.host, self.port, ip=self.up.ip_host, sni=peek.sni)

    async def serve_plain(self) -> None:
        await self._http(self.client)

    def _target(self) -> Target:
        tls = (self.host, (HTTP1_ALPN,)) if self.scheme == "https" else None
        return Target(self.scheme, self.host, self.port, self.up, tls, self.authority)

    async def _http(self, client: Stream) -> None:
        if self.scheme == "https" and self.up.tls is None:
            try:
                await self.up.start_tls(self.host, (HTTP1_ALPN,))
            except UpstreamError as e:
                self.ctx.error(e.stage, e.message, address=self.up.address)  # type: ignore
                self.up.close()
                await answer_with_error(self.ctx, client, e)
                return
        target = self._target()
        try:
            await serve_http1(self.ctx, client, target)
        finally:
            target.upstream.close()

    async def upstream_tls(self, server_name: str, alpn: tuple[str, ...]) -> str | None:
        """TLS to the target only when it is https: (plain http targets get the client's
        decrypted requests); always under the target's own name."""
        if self.scheme != "https":
            return None
        tls = await self.up.start_tls(self.host, alpn)
        return tls.ssl.selected_alpn_protocol()

    async def _bridge(self, ctls: TLSStream, server_name: str, offered: tuple) -> None:
        if ctls.ssl.selected_alpn_protocol() == H2_ALPN:
            from dumpproxy.http2 import H2Bridge  # h2 costs startup time: load on first use

            bridge = H2Bridge(self.ctx, ctls, self.up, self.scheme, self.host)
            bridge.authority = self.authority
            await bridge.run()
            return
        await self._http(ctls)


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
        try:
            up = await ctx.open_upstream(host, port)
        except UpstreamError as e:
            ctx.error(e.stage, e.message, address=dst)  # type: ignore[arg-type]
            return
        mine = up.sock.transport.get_extra_info("sockname") if up.sock.transport else None
        try:
            await Tunnel(ctx, client, up, host, port).run()
        finally:
            up.close()
            if mine:
                self.loop_guard.ports.discard(mine[1])


MODE_CLASSES: dict[str, type[Mode]] = {
    "regular": RegularMode,
    "upstream": UpstreamMode,
    "reverse": ReverseMode,
    "socks5": Socks5Mode,
    "transparent": TransparentMode,
}


def make_mode(spec: ModeSpec, cfg: Config) -> Mode:
    return MODE_CLASSES[spec.kind](spec, cfg)

