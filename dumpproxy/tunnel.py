"""The path every mode shares once the destination is known.

A mode learns where its client wants to go and hands over a `Destination` (a small value);
`serve` connects to it, tells the client through the mode's `Answer` (CONNECT's 200, a
SOCKS5 reply), peeks at the client's first bytes, decides (`decision`), and then either
relays verbatim (passthrough) or intercepts: TLS terminated on both sides (`clienttls`),
then the HTTP/2 or HTTP/1 bridge, chosen by ALPN. The upstream connection is held here
for the tunnel's whole life and released at its end.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Protocol

from dumpproxy.addresses import check_host, is_ip, join_host_port, split_host_port
from dumpproxy.clienthello import Peek
from dumpproxy.clienttls import H2_ALPN, HTTP1_ALPN, SUPPORTED_ALPN, ClientTLS, usable_sni
from dumpproxy.context import Context
from dumpproxy.hostfilter import Egress, candidates
from dumpproxy.http1_server import Target, serve_http1
from dumpproxy.peek import peek_client, peek_first_bytes
from dumpproxy.relay import Relay, RelayIdle
from dumpproxy.streams import Stream, TLSStream
from dumpproxy.upstream import TLSRequest, Upstream, UpstreamError


class Answer(Protocol):
    """How a mode tells its client whether the way to the destination is open."""

    def connected(self, up: Upstream | None) -> bool:
        """The upstream connection is up (None: a lazy destination's, to be made once the
        client's first bytes are read); False when the client could not be told."""
        ...

    async def failed(self, err: UpstreamError, dest: Destination) -> bool:
        """It could not be made; True when the answer recorded the error itself (with the
        flow of the request it answered), else the shared path writes it."""
        ...

    def blocked(self, why: str) -> None:
        """The egress lists keep the destination out (why: the 403's text)."""
        ...


@dataclass(frozen=True)
class Destination:
    """Where a client's connection goes, as its mode learned it.

    scheme: the destination's own scheme, whatever the client speaks (reverse mode: an
    https target gets TLS from us also for a plaintext client, and the target's name, not
    the client's SNI, for its certificate and URLs); None: as the client speaks (TLS from
    the client means TLS to the destination, under the client's SNI).
    authority: the Host (`:authority`) every request gets (reverse mode).
    host_header: the Host header of a plaintext request is a decision candidate."""

    host: str
    port: int
    answer: Answer | None = None
    scheme: str | None = None
    authority: bytes | None = None
    host_header: bool = True
    lazy: bool = False  # the client's answer needs no upstream connection (CONNECT's 200,
    # reverse mode): with an idle pooled connection to it, connecting may wait
    judged: bool = True  # False: an egress verdict waits for the client's first bytes

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def server_name(self, sni: str | None) -> str:
        """The name the client's certificate is made for and URLs are written with."""
        return self.host if self.scheme else (sni or self.host)


async def serve(ctx: Context, client: Stream, dest: Destination) -> None:
    """Connect to the destination, tell the client, then run the tunnel.

    A lazy destination (a CONNECT) to which the pool holds an idle TLS connection is
    answered at once, and connected only once the client's first bytes say how: an
    intercepted TLS client takes the pooled connection made for its server name, if any.

    With egress lists a destination named by the client is judged first, and a blocked one
    never connected; one known by its address only is lazy too, its verdict waiting for
    the names in the client's first bytes (SNI, Host)."""
    verdict = None
    policy = ctx.services.filter
    if policy.egress_on:
        if is_ip(dest.host):  # (audit mode blocks nothing: connected as usual)
            if not policy.audit:
                dest = dataclasses.replace(dest, lazy=True, judged=False)
        else:
            verdict = ctx.egress(dest.host, dest.port)
            if verdict is not None and verdict.enforced:
                ctx.decide(dest.host, dest.port, candidates(dest.host, dest.port), None,
                           verdict)
                if dest.answer is not None:
                    dest.answer.blocked(verdict.refusal(dest.address))
                return
    pooled = ctx.pooled_address(dest.host, dest.port) if dest.lazy else None
    up = None
    if pooled is None and dest.judged and not (dest.lazy and ctx.cfg.replay is not None):
        # replay: a connection is made only when a request is forwarded (SPEC §9.3)
        try:  # a fresh connection: what the client will send on it is not known yet
            up = await ctx.open_upstream(dest.host, dest.port, reuse=False)
        except UpstreamError as e:
            if dest.answer is None or not await dest.answer.failed(e, dest):
                ctx.error(e.stage, e.message, address=dest.address)  # type: ignore[arg-type]
            return
    tunnel = Tunnel(ctx, client, up, dest, pooled, verdict)
    try:
        if dest.answer is None or dest.answer.connected(up):
            await tunnel.run()
    finally:
        if tunnel.up is not None:
            tunnel.up.release()


class HttpAnswer:
    """For a mode with no protocol of its own (reverse): a failure is the answer to the
    client's first request, when it speaks HTTP/1 (recorded as that exchange)."""

    def __init__(self, ctx: Context, client: Stream, scheme: str, authority: bytes | None):
        self.ctx = ctx
        self.client = client
        self.scheme = scheme
        self.authority = authority

    def connected(self, up: Upstream | None) -> bool:
        return True

    def blocked(self, why: str) -> None:
        pass  # a close

    async def failed(self, err: UpstreamError, dest: Destination) -> bool:
        _, peek = await peek_client(self.client, self.ctx.cfg.peek_timeout)
        if peek.kind != "http":
            return False
        target = Target(self.scheme, dest.host, dest.port, None, authority=self.authority,
                        failure=err)
        await serve_http1(self.ctx, self.client, target)
        target.release(self.ctx, dest.address)
        return True


class Tunnel:
    """A client stream with a known destination and its upstream connection: open already,
    or (lazy) made once the client's first bytes say which one (see `serve`)."""

    def __init__(self, ctx: Context, client: Stream, up: Upstream | None, dest: Destination,
                 pooled: str | None = None, egress: Egress | None = None):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.client = client
        self.up = up
        self.dest = dest
        # the resolved peer, a decision candidate: the connection's, or the pooled one's
        self.ip_host = up.ip_host if up is not None else pooled
        self.opened = time.monotonic()
        self.egress = egress  # the verdict judged on the destination's name, if any

    async def _peek(self) -> tuple[bytes, Peek]:
        # No longer than the head timeout: a silent client is cut by then anyway.
        return await peek_first_bytes(self.client, min(
            time.monotonic() + self.cfg.peek_timeout, self.opened + self.cfg.head_timeout))

    async def _connect(self, tls: TLSRequest | None = None, http: bool = True) -> Upstream:
        """The upstream connection, made now if the tunnel was lazy (TLS as asked; an idle
        one from the pool when it will carry HTTP)."""
        if self.up is None:
            self.up = await self.ctx.open_upstream(self.dest.host, self.dest.port, tls,
                                                   reuse=http)
        elif tls is not None and self.up.tls is None:
            await self.up.start_tls(*tls)
        return self.up

    def _drop_upstream(self) -> None:
        if self.up is not None:
            self.up.release()
            self.up = None

    async def run(self) -> None:
        """Peek, decide, then relay or intercept (TLS, or plaintext HTTP/1)."""
        ctx, dest = self.ctx, self.dest
        # The first bytes are needed anyway (TLS or plaintext): the decision names the SNI
        # and Host the client sent, patterns or not, at no cost in latency.
        data, peek = await self._peek()
        if not data and self._replayed_here(dest.host):
            # replay: a client silent so far (a browser's spare connection) may speak until
            # the head timeout; the destination is never asked for a silent one
            data, peek = await peek_first_bytes(self.client,
                                                self.opened + self.cfg.head_timeout)
            if not data:
                return
        decision = ctx.decide(dest.host, dest.port, candidates(
            dest.host, dest.port, ip=self.ip_host, sni=peek.sni,
            host_header=peek.host if dest.host_header else None), peek.sni, self.egress)
        if decision.action == "block":  # known by address, its names not allowed: closed
            return
        if not data:
            if self.up is None and getattr(self.client, "ended", None) is not None:
                # Gone before its first byte (a client's dial it no longer needed: Go's
                # HTTP client cancels them, several a second under load): a lazy tunnel
                # makes no connection for it.
                return
            # a silent client (or a server-first protocol): the head timeout holds
            left = self.cfg.head_timeout - (time.monotonic() - self.opened)
            await self.relay(first_timeout=max(left, 0.001))
        elif dest.scheme == "https" and peek.kind != "tls" and (
                decision.passthrough or peek.kind == "other"):
            # plaintext that is not ours to speak, for a TLS destination: never relayed
            # raw into its TLS port
            ctx.error("http", f"{dest.address} speaks TLS; the client sent plaintext that "
                      "is neither HTTP/1 nor HTTP/2 (or its destination is passed through): "
                      "connection closed", address=dest.address)
        elif peek.kind == "h2c" and dest.scheme == "https":
            await self.serve_h2c()
        elif decision.passthrough or peek.kind in ("other", "h2c"):
            await self.relay()
        elif peek.kind == "tls":
            await self.intercept_tls(peek)
        else:
            await self.serve_plain(peek)

    async def relay(self, first_timeout: float | None = None) -> None:
        address = self.dest.address
        try:
            up = await self._connect(http=False)  # raw bytes: never a pooled connection
        except UpstreamError as e:  # a lazy tunnel: the client only sees it close
            self.ctx.error(e.stage, e.message, address=address)  # type: ignore[arg-type]
            return
        relay = Relay(self.client, up.stream, self.cfg.idle_timeout, first_timeout)
        try:
            await relay.run()
        except RelayIdle as e:
            why = str(e)
            if first_timeout is not None and not (relay.to_server or relay.to_client):
                why = f"no data from either side within {self.cfg.head_timeout:g} s"
            self.ctx.error("relay", f"tunnel to {address} closed: {why}", address=address)
        except (ConnectionError, OSError) as e:
            if not relay.teardown(e):  # else: recorded on the disconnect events (`how`)
                self.ctx.error("relay", f"tunnel to {address} reset: {e}", address=address)
        except Exception as e:
            self.ctx.error("relay", f"tunnel to {address} closed: {e}", address=address)
        finally:
            up.release()

    async def serve_plain(self, peek: Peek) -> None:
        """Plaintext HTTP/1 from the client (TLS to a destination whose scheme says so).
        A destination known by its address only (transparent mode, a CONNECT to an IP) is
        named by the client's Host header, as a TLS one is by its SNI."""
        dest = self.dest
        name = dest.host
        if peek.host and dest.host_header and not dest.scheme and is_ip(dest.host):
            try:
                host, _ = split_host_port(peek.host, default_port=dest.port)
                check_host(host)
                name = host
            except ValueError:
                pass  # no usable name: the address it is
        failure = None
        try:
            if self.up is not None or self.cfg.replay is None:  # else: when forwarded
                await self._connect((dest.host, (HTTP1_ALPN,)) if dest.scheme == "https"
                                    else None)
        except UpstreamError as e:  # told to the client's first request
            self._drop_upstream()
            failure = e
        await self._http1(self.client, dest.scheme or "http", name, (HTTP1_ALPN,), failure)

    async def serve_h2c(self) -> None:
        """HTTP/2 in plaintext (prior knowledge) for a TLS destination: HTTP/2 over TLS to
        it, when it speaks HTTP/2; else the client is refused with a GOAWAY."""
        ctx, dest = self.ctx, self.dest
        try:
            up = await self._connect((dest.host, (H2_ALPN,)))
        except UpstreamError as e:
            self._drop_upstream()
            ctx.error(e.stage, e.message, address=dest.address)  # type: ignore[arg-type]
            self._refuse_h2(f"{dest.address} could not be reached over TLS")
            return
        if up.tls is None or up.tls.ssl.selected_alpn_protocol() != H2_ALPN:
            ctx.error("http2", f"{dest.address} does not speak HTTP/2 (ALPN), and an HTTP/2 "
                      "client cannot be served over HTTP/1: send HTTP/1 or TLS",
                      address=dest.address)
            self._refuse_h2("HTTP/2 is not available at the destination: use HTTP/1.1")
            return
        from dumpproxy.http2 import H2Bridge

        await H2Bridge(ctx, self.client, up, dest.scheme or "http", dest.host,
                       dest.authority).run()

    def _refuse_h2(self, reason: str) -> None:
        from h2.errors import ErrorCodes

        from dumpproxy.h2conn import refusal

        try:
            self.client.write(refusal(ErrorCodes.HTTP_1_1_REQUIRED, reason))
        except ConnectionError:
            pass

    async def _upstream_tls(self, name: str, offered: tuple[str, ...]) -> str | None:
        """TLS with the destination before the client's handshake (unless the destination
        is plain http); the ALPN it chose."""
        if self.dest.scheme == "http":
            await self._connect()  # HTTP from the client's TLS, to a plain origin
            return None
        up = await self._connect((name, tuple(p for p in offered if p in SUPPORTED_ALPN)))
        return up.tls.ssl.selected_alpn_protocol() if up.tls is not None else None

    def _replayed_here(self, name: str) -> bool:
        """Under replay, with no connection made: the destination is served from the
        record, or a miss would not be forwarded anyway."""
        replay = self.cfg.replay
        return replay is not None and self.up is None and (
            not replay.forward or replay.serves(name, self.dest.port))

    def _replay_alpn(self, name: str, offered: tuple[str, ...]) -> tuple[str, ...] | None:
        """Under replay: the client's ALPN chosen here (h2 when offered) when the
        destination is not to be asked (`_replayed_here`); None: settled with it."""
        if self.dest.scheme == "http" or not self._replayed_here(name):
            return None
        return tuple(p for p in (H2_ALPN, HTTP1_ALPN) if p in offered)[:1]

    async def intercept_tls(self, peek: Peek) -> None:
        ctx, address = self.ctx, self.dest.address
        if not usable_sni(ctx, peek.sni, address):
            return
        name = self.dest.server_name(peek.sni)
        offered = peek.alpn
        upstream_error: UpstreamError | None = None

        async def offer() -> tuple[str, ...]:
            # ALPN is settled upstream first, so that both sides speak the same protocol.
            nonlocal upstream_error
            local = self._replay_alpn(name, offered)
            if local is not None:
                return local
            try:
                chosen = await self._upstream_tls(name, offered)
            except UpstreamError as e:
                upstream_error = e  # told to the client's first request
                self._drop_upstream()
                chosen = None
            return (chosen,) if chosen else ((HTTP1_ALPN,) if HTTP1_ALPN in offered else ())

        tls = ClientTLS(ctx, self.client, name, address, peek.sni)
        ctls = await tls.handshake(offer)
        if ctls is None:
            if self.up is not None:  # unused: another client may have it
                self.up.release(reusable=True)
                self.up = None
            if upstream_error is not None:
                ctx.error(upstream_error.stage, upstream_error.message,  # type: ignore
                          address=address)
            await tls.failed()
            return
        if upstream_error is not None:
            await self._http1(ctls, self.dest.scheme or "https", name, (), upstream_error)
            ctls.write_eof()
            return
        tls.serving()
        try:
            await self._bridge(ctls, name, offered)
        finally:
            tls.finish()
        await tls.judge_silence()

    async def _bridge(self, ctls: TLSStream, name: str, offered: tuple[str, ...]) -> None:
        """The intercepted client's HTTP/2 or HTTP/1 to the destination, by ALPN."""
        scheme = self.dest.scheme or "https"
        if ctls.ssl.selected_alpn_protocol() == H2_ALPN:
            from dumpproxy.http2 import H2Bridge  # h2 costs startup time: load on first use

            up = self.up
            try:
                await H2Bridge(self.ctx, ctls, up, scheme, name, self.dest.authority,
                               (self.dest.host, self.dest.port)).run()
            finally:
                if up is not None:
                    up.release()
            return
        # Reconnects for HTTP/1 clients must not end up speaking h2 upstream.
        await self._http1(ctls, scheme, name,
                          (HTTP1_ALPN,) if HTTP1_ALPN in offered else ())

    async def _http1(self, client: Stream, scheme: str, name: str, alpn: tuple[str, ...],
                     failure: UpstreamError | None = None) -> None:
        """HTTP/1 requests from the client, all to the destination (or, when it could not
        be reached, the first one answered with the failure). The Target holds the
        connection from here on."""
        dest, up = self.dest, self.up
        self.up = None
        tls = (name, alpn) if up is not None and up.tls else None  # how to reconnect
        lazy = None
        if up is None and failure is None:  # replay: connected for a forwarded miss
            lazy = (dest.host, dest.port)
            tls = (name, alpn) if scheme == "https" else None
        target = Target(scheme, name, dest.port, None if failure else up, tls,
                        dest.authority, failure, lazy=lazy)
        try:
            await serve_http1(self.ctx, client, target)
        finally:
            target.release(self.ctx, dest.address)
