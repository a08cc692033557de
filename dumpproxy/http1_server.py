"""Serving HTTP/1 requests from one client stream: what happens before the pump runs.

Two places speak HTTP/1 to clients: the explicit proxy (absolute-form requests, each
decided on its own, authenticated when `--proxyauth` is set, CONNECT handed back to the
caller) and an intercepted tunnel (origin-form requests to its fixed destination). For
each request this module parses the target, checks the framing and the credentials,
decides, picks the upstream connection, starts the flow record, and hands the exchange to
the pump in `http1`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from dumpproxy import auth
from dumpproxy import headers as hdr
from dumpproxy import http1_wire as wire
from dumpproxy.addresses import DEFAULT_PORTS, BadHost, check_host, join_host_port
from dumpproxy.context import Context
from dumpproxy.flows import Flow, build_url
from dumpproxy.hostfilter import candidates
from dumpproxy.http1 import Exchange, answer, refuse
from dumpproxy.http1_replay import Forward, ForwardedExchange
from dumpproxy.http1_replay import serve as replay_http1
from dumpproxy.http1_wire import MAX_HEAD, Wire, protocol_error_text
from dumpproxy.replay import Request as ReplayRequest
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import TLSRequest, Upstream, UpstreamError

MAX_UPSTREAMS = 8  # per client connection of the explicit proxy (several origins)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Connect:
    """A CONNECT request, handed back to the caller with the connection it came on."""

    h: Wire
    request: wire.Request


@dataclass
class Target:
    """A fixed destination (inside a tunnel): every request goes there."""

    scheme: str
    host: str  # as named in URLs and events (the SNI, else the CONNECT host)
    port: int
    upstream: Upstream | None  # the current connection; a reconnect goes where it went
    tls: TLSRequest | None = None  # how to reconnect
    authority: bytes | None = None  # reverse mode: the Host header every request gets
    # The destination could not be reached (or its TLS failed) before any request was
    # read: the first request is answered with it, and the error carries its flow.
    failure: UpstreamError | None = None
    told: bool = False  # the failure was given to a request
    # replay: no connection until a miss is forwarded; then to this host and port
    lazy: tuple[str, int] | None = None

    async def connection(self, ctx: Context) -> Upstream:
        if self.failure is not None:
            self.told = True
            raise self.failure
        up = self.upstream
        if up is None and self.lazy is not None:
            self.upstream = up = await ctx.open_upstream(*self.lazy, self.tls)
        assert up is not None
        if not up.reusable:
            up.release()
            self.upstream = up = await ctx.open_upstream(up.host, up.port, self.tls)
        return up

    def release(self, ctx: Context, address: str) -> None:
        """The client is done with this destination: its connection goes back, and a
        failure no request was told of becomes an error of its own."""
        if self.upstream is not None:
            self.upstream.release(reusable=True)  # kept for others if it is healthy
        if self.failure is not None and not self.told:
            ctx.error(self.failure.stage, self.failure.message,  # type: ignore[arg-type]
                      address=address)


class UpstreamPool:
    """The explicit proxy's upstream connections: one per target, reused across requests."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._by_target: dict[tuple[str, str, int], Upstream] = {}

    async def get(self, scheme: str, host: str, port: int) -> Upstream:
        key = (scheme, host.lower(), port)
        up = self._by_target.get(key)
        if up is not None and up.reusable:
            return up
        if up is not None:
            up.release()
        if len(self._by_target) >= MAX_UPSTREAMS:  # drop the oldest
            old = self._by_target.pop(next(iter(self._by_target)))
            old.release(reusable=old.reusable)
        tls = (host, ("http/1.1",)) if scheme == "https" else None
        up = await self.ctx.open_upstream(host, port, tls, forward=scheme == "http")
        self._by_target[key] = up
        return up

    def release_all(self) -> None:
        """The client connection is over: its upstreams go back to their owner."""
        for up in self._by_target.values():
            up.release(reusable=up.reusable)
        self._by_target.clear()


def _target_text(raw: str, redact: bool) -> str:
    return repr(re.sub(r"//[^/@]*@", "//<redacted>@", raw) if redact else raw)


def check_version(req: wire.Request) -> None:
    """Another HTTP version would be sent on as HTTP/1.1: refused."""
    if req.http_version not in (b"1.1", b"1.0"):
        version = req.http_version.decode("latin-1")
        raise BadRequest(f"HTTP/{version} is not supported on an HTTP/1 connection", 505)


def check_head(req: wire.Request, items: list[tuple[bytes, bytes]], facts: hdr.Facts) -> None:
    """What the parser lets through but a proxy must not forward: a head over the cap that
    arrived in one piece (the cap must not depend on segmentation), a framing field spelled
    with `_` (back ends that fold `_` into `-` would see a second framing header:
    smuggling), both Content-Length and Transfer-Encoding."""
    size = len(req.method) + len(req.target)
    for name, value in items:
        size += len(name) + len(value) + 4
        if b"_" in name and name.lower().replace(b"_", b"-") in hdr.FRAMING:
            raise BadRequest(f"header name {name.decode('latin-1')!r} looks like a framing "
                             "field: refused")
    if size > MAX_HEAD:
        raise BadRequest(f"request head larger than {MAX_HEAD} bytes", 431)
    if facts.framing_conflict:
        raise BadRequest("request has both Content-Length and Transfer-Encoding")


def parse_target(raw: str, fixed: Target | None, redact: bool) -> tuple[str, str, int, str]:
    """The request target as (scheme, host, port, origin-form path)."""
    if raw.startswith("/"):
        if fixed is None:
            raise BadRequest(
                "dumpproxy is a proxy: send absolute-form requests (GET http://host/ HTTP/1.1)"
            )
        return fixed.scheme, fixed.host, fixed.port, raw
    parse = _absolute_cached if len(raw) <= 1024 else _absolute
    if fixed is not None:  # absolute-form inside a tunnel: the tunnel decides
        return fixed.scheme, fixed.host, fixed.port, parse(raw, redact, False)[3]
    return parse(raw, redact, True)


def _absolute(raw: str, redact: bool, check: bool) -> tuple[str, str, int, str]:
    """An absolute-form target's parts (check: its host too); pure, so cached."""
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as e:
        raise BadRequest(f"bad request target {_target_text(raw, redact)}: {e}") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in DEFAULT_PORTS or not host:
        raise BadRequest(f"unsupported request target {_target_text(raw, redact)}")
    if check:
        try:
            check_host(host)
        except BadHost as e:
            raise BadRequest(str(e)) from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or DEFAULT_PORTS[scheme], path


# A keep-alive client asks for the same URLs again and again: the last 64 short ones are
# kept (each with its path: some 150 KB at most).
_absolute_cached = lru_cache(maxsize=64)(_absolute)


async def serve_http1(ctx: Context, client: Stream, target: Target | None) -> Connect | None:
    """Serve HTTP/1 requests from one client stream until it closes.

    target None: explicit proxy (absolute-form, decided per request); a CONNECT request
    ends the loop and is returned to the caller, which owns tunnels.
    """
    h = Wire("server")
    pool = UpstreamPool(ctx) if target is None else None
    try:
        return await _serve(ctx, h, client, target, pool)
    finally:
        if pool is not None:
            pool.release_all()


async def _serve(ctx: Context, h: Wire, client: Stream, target: Target | None,
                 pool: UpstreamPool | None) -> Connect | None:
    cfg = ctx.cfg

    def quiesce() -> bool:
        return not h.head_started

    while True:
        if ctx.services.stopping:  # shutting down: no new exchange on this connection
            return None
        ctx.quiesce = quiesce
        try:
            ev = await h.read_event(client, cfg.head_timeout)
        except StreamTimeout:
            ctx.stream.mark("idle_timeout")
            if h.head_started:
                ctx.error("http", f"no complete request head within {cfg.head_timeout:g} s")
            return None
        except wire.RemoteProtocolError as e:
            text = protocol_error_text(e, cfg.redact)
            refuse(ctx, h, client, "http", wire.status_hint(e), f"malformed request: {text}")
            return None
        except ConnectionError:
            return None
        finally:
            ctx.quiesce = None
        if type(ev) is not wire.Request:  # ConnectionClosed (clean EOF)
            return None
        if target is None and ev.method == b"CONNECT":
            return Connect(h, ev)
        keep = await _exchange(ctx, h, client, ev, target, pool)
        if not keep or not h.next_cycle():
            return None


async def _exchange(ctx: Context, h: Wire, client: Stream, req: wire.Request,
                    target: Target | None, pool: UpstreamPool | None) -> bool:
    """One request: checks, decision, upstream, then the pump. True: keep the client.

    Once the request can be named (method and URL), it is recorded whatever happens to
    it: refused requests too, with dumpproxy's answer as their response."""
    started = time.monotonic()  # the flow's duration counts the upstream connect too
    items = req.headers.raw_items()  # (a new list)
    services = ctx.services
    denied = services.auth.refusal(items) if target is None and services.auth else None
    try:
        check_version(req)
        scheme, host, port, path = parse_target(req.target.decode("latin-1"), target,
                                                ctx.cfg.redact)
    except BadRequest as e:  # no request to record: nothing names it
        if denied:
            return refuse(ctx, h, client, "auth", 407, denied, extra=auth.CHALLENGE)
        return refuse(ctx, h, client, "http", e.status, str(e))
    address = join_host_port(host, port)

    def record() -> Flow:
        return Flow(ctx, req.method.decode("latin-1"), scheme, host, port, path,
                    "HTTP/" + req.http_version.decode(), items, started)

    if denied:
        return refuse(ctx, h, client, "auth", 407, denied, record(), extra=auth.CHALLENGE)
    head = wire.fields(req)
    facts = hdr.Facts(head)
    try:
        check_head(req, items, facts)
    except BadRequest as e:
        return refuse(ctx, h, client, "http", e.status, str(e), record())
    fl: Flow | None = None
    # egress: judged on the name the client gave, before any connection or DNS lookup
    egress = ctx.egress(host, port) if pool is not None and ctx.services.filter.egress_on \
        else None
    if egress is not None and egress.enforced:
        fl = record()
        ctx.decide(host, port, candidates(host, port), None, egress, fl.flow)
        answer(ctx, h, client, fl, 403, egress.refusal(address))
        return False
    forward: Forward | None = None
    replay = ctx.cfg.replay
    if replay is not None:  # decided before any connection: replayed ones get none
        if pool is None or not ctx.decide(host, port, candidates(host, port), None,
                                          egress).passthrough:
            fl = record()
            asked = ReplayRequest(fl.method.upper(), scheme, host, port, path)
            served = await replay_http1(ctx, h, client, req, items, replay, fl, asked)
            if not isinstance(served, Forward):
                return served
            forward = served
    try:
        if pool is not None:
            up = await pool.get(scheme, host, port)
            recorded = fl is not None if replay is not None else not ctx.decide(
                host, port, candidates(host, port, ip=up.ip_host), None, egress).passthrough
        else:
            up = await target.connection(ctx)  # type: ignore[union-attr]
            recorded = True
    except UpstreamError as e:
        # unreachable: decided on what is known without a connection
        if fl is None and replay is None and (pool is None or not ctx.decide(
                host, port, candidates(host, port), None, egress).passthrough):
            fl = record()
        return refuse(ctx, h, client, e.stage, e.status, e.message,  # type: ignore[arg-type]
                      fl, address)
    if recorded:
        fl = fl or record()
    else:  # passed through: counted, not recorded
        fl = None
        services.stats.requests += 1
    upgrade = facts.wants_upgrade
    out = hdr.forwardable_fields(head, keep_upgrade=upgrade, tokens=facts.connection)
    if target is not None and target.authority is not None:  # reverse mode
        out = [f for f in out if f[1] != b"host"]
        out.insert(0, (b"Host", b"host", target.authority))
    elif not facts.host or b"host" in facts.connection:  # none, or Connection named it
        out.insert(0, (b"Host", b"host", join_host_port(host, port).encode()))
    wire_target = path.encode()
    if up.absolute_form:  # to an upstream proxy: absolute form, with its credentials
        wire_target = build_url(scheme, host, port, path).encode()
        out.extend(hdr.fields(up.proxy_headers))
    if forward is not None:
        return await ForwardedExchange(ctx, h, client, req, up, wire_target, out, upgrade, fl,
                                       events=forward.events).run()
    return await Exchange(ctx, h, client, req, up, wire_target, out, upgrade, fl).run()
