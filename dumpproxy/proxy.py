"""The proxy: listener, per-client connection state, decisions, statistics, shutdown."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
import ssl
import sys
import time

import h11

from dumpproxy import __version__
from dumpproxy import headers as hdr
from dumpproxy.certs import CertStore
from dumpproxy.config import Config
from dumpproxy.events import EventWriter
from dumpproxy.hostfilter import Decision, HostFilter, PatternError, join_host_port, split_host_port
from dumpproxy.http1 import AUTH_CHALLENGE, answer_error, send, serve_http1
from dumpproxy.streams import SocketStream
from dumpproxy.tunnel import Tunnel
from dumpproxy.upstream import Upstream, UpstreamError, tcp_connect

SHUTDOWN_GRACE = 2.0
MAX_UPSTREAMS = 8  # per client connection (explicit proxy, several origins)


class ClientConn:
    """State of one client connection: its id, upstream connections, events."""

    def __init__(self, proxy: Proxy, stream: SocketStream, cid: int):
        self.proxy = proxy
        self.stream = stream
        self.id = cid
        peer = stream.peername or ("?", 0)
        self.client = join_host_port(peer[0], peer[1])
        self.started = time.monotonic()
        self.upstreams: set[Upstream] = set()
        self._by_target: dict[tuple[str, str, int], Upstream] = {}

    def error(self, stage: str, message: str, **extra) -> None:
        fields = {"stage": stage, "message": message}
        fields.update({k: v for k, v in extra.items() if v is not None})
        self.proxy.emit("error", fields, self)

    def decide(self, host: str, port: int, cands: list[str], sni: str | None) -> Decision:
        d = self.proxy.filter.decide(cands)
        if d.passthrough:
            self.proxy.stats_passthrough += 1
        self.proxy.emit(
            "decision", {"address": join_host_port(host, port), **d.fields(), "sni": sni}, self
        )
        return d

    async def upstream_for(self, scheme: str, host: str, port: int) -> Upstream:
        """Explicit proxy: a connection per target, reused across requests."""
        key = (scheme, host.lower(), port)
        up = self._by_target.get(key)
        if up is not None and up.reusable:
            return up
        if up is not None:
            up.close()
        if len(self._by_target) >= MAX_UPSTREAMS:
            for k, old in list(self._by_target.items()):
                old.close()
                del self._by_target[k]
                break
        tls = (host, ("http/1.1",)) if scheme == "https" else None
        up = await Upstream.open(self, host, port, tls)
        self._by_target[key] = up
        return up

    async def connect_tunnel(self, h: h11.Connection, client: SocketStream,
                             req: h11.Request) -> None:
        """CONNECT: connect upstream first, answer 200, then run the shared tunnel path."""
        items = list(req.headers.raw_items())
        target = req.target.decode("latin-1")
        reply = None
        if not self.proxy.authorized(items):
            self.error("auth", "proxy authentication required")
            reply = (407, "Proxy authentication required")
        else:
            try:
                host, port = split_host_port(target)
            except ValueError as e:
                self.error("http", f"bad CONNECT target: {e}")
                reply = (400, f"Bad CONNECT target: {e}")
            else:
                try:
                    up = await Upstream.open(self, host, port)
                except UpstreamError as e:
                    self.error(e.stage, e.message, address=join_host_port(host, port))
                    reply = (e.status, e.message)
        if reply is not None:
            status, message = reply
            answer_error(h, client, status, message, AUTH_CHALLENGE if status == 407 else ())
            return
        try:
            send(h, client, h11.Response(status_code=200, headers=[],
                                         reason=b"Connection established"))
        except ConnectionError:
            up.close()
            return
        client.unread(h.trailing_data[0])
        try:
            await Tunnel(self, client, up, host, port).run()
        finally:
            up.close()

    def close(self) -> None:
        for up in list(self.upstreams):
            up.close()
        self.stream.close()


class _Accepted(SocketStream):
    """A client socket: starts its handler when the connection is made."""

    def __init__(self, proxy: Proxy):
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.proxy.accept(self)


class Proxy:
    def __init__(self, cfg: Config, writer: EventWriter, hfilter: HostFilter,
                 certs: CertStore):
        self.cfg = cfg
        self.writer = writer
        self.filter = hfilter
        self.certs = certs
        self.started = time.monotonic()
        self.tasks: set[asyncio.Task] = set()
        self._ids = 0
        self._flows = 0
        self.stats_connections = 0
        self.stats_requests = 0
        self.stats_passthrough = 0
        self.stats_errors = 0
        self._up_contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._auth: bytes | None = None
        if cfg.proxyauth:
            self._auth = base64.b64encode(cfg.proxyauth.encode())
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    # -- events --
    def emit(self, event: str, fields: dict | None = None, conn: ClientConn | None = None):
        if event == "error":
            self.stats_errors += 1
            if self.cfg.verbosity > 0:
                who = f"{conn.client}: " if conn else ""
                print(f"dumpproxy: {who}{fields['stage']}: {fields['message']}",  # type: ignore
                      file=sys.stderr)
        return self.writer.emit(event, fields, conn)

    def next_flow(self) -> int:
        self._flows += 1
        return self._flows

    # -- shared helpers for the bridges --
    def authorized(self, items: list[tuple[bytes, bytes]]) -> bool:
        if self._auth is None:
            return True
        value = hdr.header_value(items, b"proxy-authorization")
        if value is None:
            return False
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            token = base64.b64encode(base64.b64decode(token.strip(), validate=True))
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(token, self._auth)

    async def connect(self, host: str, port: int) -> SocketStream:
        """The mode-specific step: how a TCP connection to the destination is made."""
        return await tcp_connect(host, port, self.cfg.connect_timeout)

    def upstream_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        ctx = self._up_contexts.get(alpn)
        if ctx is None:
            ctx = make_upstream_context(self.cfg)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            self._up_contexts[alpn] = ctx
        return ctx

    def reload_filter(self) -> None:
        """SIGHUP: re-read pattern files; a bad file keeps the old set."""
        try:
            self.filter = self.cfg.sources.load()
        except PatternError as e:
            self.emit("error", {"stage": "reload", "message": f"{e}; keeping previous patterns"})
            return
        if self.cfg.verbosity > 0:
            print(
                f"dumpproxy: reloaded patterns ({len(self.filter.allow)} allow, "
                f"{len(self.filter.ignore)} ignore)",
                file=sys.stderr,
            )

    # -- connections --
    def accept(self, stream: SocketStream) -> None:
        self._ids += 1
        self.stats_connections += 1
        cc = ClientConn(self, stream, self._ids)
        task = asyncio.get_running_loop().create_task(self._serve(cc))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, cc: ClientConn) -> None:
        self.emit("client_connect", None, cc)
        try:
            await serve_http1(cc, cc.stream, None)
        except asyncio.CancelledError:
            pass
        except Exception as e:  # a bug must cost one connection, never the proxy
            cc.error("internal", f"{type(e).__name__}: {e}")
        finally:
            cc.close()
            self.emit(
                "client_disconnect",
                {"duration_ms": round((time.monotonic() - cc.started) * 1000, 3)},
                cc,
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Accepted(self), self.cfg.listen_host, self.cfg.listen_port,
            reuse_address=True, backlog=1024,
        )
        sock = self.server.sockets[0].getsockname()
        self.address = join_host_port(sock[0], sock[1])
        self.emit(
            "listening",
            {
                "address": self.address,
                "mode": self.cfg.mode,
                "version": __version__,
                "pid": os.getpid(),
                "ca_cert": self.certs.ca.cert_path,
                "schema": 1,
            },
        )
        self.writer.flush()

    async def stop(self, reason: str, grace: float = 0.0) -> None:
        """Stop accepting, let in-flight work end (up to grace), cancel the rest."""
        if self.server is not None:
            self.server.close()
        if grace and self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=SHUTDOWN_GRACE)
        self.emit(
            "shutdown",
            {
                "reason": reason,
                "connections": self.stats_connections,
                "requests": self.stats_requests,
                "passthrough": self.stats_passthrough,
                "errors": self.stats_errors,
                "uptime_s": round(time.monotonic() - self.started, 3),
            },
        )
        self.writer.flush()
        self.certs.close()


def make_upstream_context(cfg: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if cfg.upstream_ca:
        ctx.load_verify_locations(cafile=cfg.upstream_ca)
    if cfg.ssl_insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
