"""The path every mode shares once the destination is known.

A mode learns where its client wants to go and hands over a `Destination` (a small value);
`serve` connects to it, tells the client through the mode's `Answer` (CONNECT's 200, a
SOCKS5 reply), peeks at the client's first bytes, decides (`decision`), and then either
relays verbatim (passthrough) or intercepts: TLS terminated on both sides (`clienttls`),
then the HTTP/2 or HTTP/1 bridge, chosen by ALPN. The upstream connection is held here
for the tunnel's whole life and released at its end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from dumpproxy.addresses import join_host_port
from dumpproxy.clienthello import Peek
from dumpproxy.clienttls import H2_ALPN, HTTP1_ALPN, SUPPORTED_ALPN, ClientTLS, usable_sni
from dumpproxy.context import Context
from dumpproxy.hostfilter import candidates
from dumpproxy.http1_server import Target, serve_http1
from dumpproxy.http1_wire import ProtocolError, Request, Wire, error_response
from dumpproxy.peek import peek_client, peek_first_bytes
from dumpproxy.relay import Relay, RelayIdle
from dumpproxy.streams import Stream, StreamTimeout, TLSStream
from dumpproxy.upstream import Upstream, UpstreamError


class Answer(Protocol):
    """How a mode tells its client whether the way to the destination is open."""

    def connected(self, up: Upstream) -> bool:
        """The upstream connection is up; False when the client could not be told."""
        ...

    async def failed(self, err: UpstreamError) -> None:
        """It could not be made (the `error` event is written already)."""
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

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def server_name(self, sni: str | None) -> str:
        """The name the client's certificate is made for and URLs are written with."""
        return self.host if self.scheme else (sni or self.host)


async def serve(ctx: Context, client: Stream, dest: Destination) -> None:
    """Connect to the destination, tell the client, then run the tunnel."""
    try:
        up = await ctx.open_upstream(dest.host, dest.port)
    except UpstreamError as e:
        ctx.error(e.stage, e.message, address=dest.address)  # type: ignore[arg-type]
        if dest.answer is not None:
            await dest.answer.failed(e)
        return
    try:
        if dest.answer is None or dest.answer.connected(up):
            await Tunnel(ctx, client, up, dest).run()
    finally:
        up.release()


class HttpAnswer:
    """For a mode with no protocol of its own (reverse): a failure is answered to the
    client's first request, when it speaks HTTP."""

    def __init__(self, ctx: Context, client: Stream):
        self.ctx = ctx
        self.client = client

    def connected(self, up: Upstream) -> bool:
        return True

    async def failed(self, err: UpstreamError) -> None:
        _, peek = await peek_client(self.client, self.ctx.cfg.peek_timeout)
        if peek.kind == "http":
            await answer_with_error(self.ctx, self.client, err)


async def answer_with_error(ctx: Context, stream: Stream, err: UpstreamError) -> None:
    """Give the client's first request a readable error (e.g. upstream TLS failed)."""
    h = Wire("server")
    try:
        ev = await h.read_event(stream, ctx.cfg.head_timeout)
        if type(ev) is Request:
            for event in error_response(err.status, err.message):
                h.send(stream, event)
            await stream.drain()
            stream.write_eof()
    except (ProtocolError, ConnectionError, StreamTimeout, asyncio.TimeoutError):
        pass


class Tunnel:
    """A client stream with a known destination and an open upstream connection."""

    def __init__(self, ctx: Context, client: Stream, up: Upstream, dest: Destination):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.client = client
        self.up = up
        self.dest = dest
        self.opened = time.monotonic()

    async def _peek(self) -> tuple[bytes, Peek]:
        # No longer than the head timeout: a silent client is cut by then anyway.
        return await peek_first_bytes(self.client, min(
            time.monotonic() + self.cfg.peek_timeout, self.opened + self.cfg.head_timeout))

    async def run(self) -> None:
        """Peek, decide, then relay or intercept (TLS, or plaintext HTTP/1)."""
        ctx, dest = self.ctx, self.dest
        if ctx.services.filter.empty:  # nothing could change the outcome: decide now
            decision = ctx.decide(dest.host, dest.port,
                                  candidates(dest.host, dest.port, ip=self.up.ip_host), None)
            data, peek = await self._peek()  # still needed: TLS or plaintext, and the SNI
        else:
            data, peek = await self._peek()
            decision = ctx.decide(dest.host, dest.port, candidates(
                dest.host, dest.port, ip=self.up.ip_host, sni=peek.sni,
                host_header=peek.host if dest.host_header else None), peek.sni)
        if not data:  # a silent client (or a server-first protocol): the head timeout holds
            left = self.cfg.head_timeout - (time.monotonic() - self.opened)
            await self.relay(first_timeout=max(left, 0.001))
        elif decision.passthrough or peek.kind in ("other", "h2c"):
            await self.relay()
        elif peek.kind == "tls":
            await self.intercept_tls(peek)
        else:
            await self.serve_plain()

    async def relay(self, first_timeout: float | None = None) -> None:
        up = self.up
        relay = Relay(self.client, up.stream, self.cfg.idle_timeout, first_timeout)
        try:
            await relay.run()
        except RelayIdle as e:
            why = str(e)
            if first_timeout is not None and not (relay.to_server or relay.to_client):
                why = f"no data from either side within {self.cfg.head_timeout:g} s"
            self.ctx.error("relay", f"tunnel to {up.address} closed: {why}",
                           address=up.address)
        except (ConnectionError, OSError) as e:
            if not relay.teardown(e):  # else: recorded on the disconnect events (`how`)
                self.ctx.error("relay", f"tunnel to {up.address} reset: {e}",
                               address=up.address)
        except Exception as e:
            self.ctx.error("relay", f"tunnel to {up.address} closed: {e}",
                           address=up.address)
        finally:
            up.release()

    async def serve_plain(self) -> None:
        """Plaintext HTTP/1 from the client (TLS to a destination whose scheme says so)."""
        dest = self.dest
        if dest.scheme == "https" and self.up.tls is None:
            try:
                await self.up.start_tls(dest.host, (HTTP1_ALPN,))
            except UpstreamError as e:
                self.ctx.error(e.stage, e.message, address=self.up.address)  # type: ignore
                self.up.release()
                await answer_with_error(self.ctx, self.client, e)
                return
        await self._http1(self.client, dest.scheme or "http", dest.host, (HTTP1_ALPN,))

    async def _upstream_tls(self, name: str, offered: tuple[str, ...]) -> str | None:
        """TLS with the destination before the client's handshake (unless the destination
        is plain http); the ALPN it chose."""
        if self.dest.scheme == "http":
            return None
        tls = await self.up.start_tls(name, tuple(p for p in offered if p in SUPPORTED_ALPN))
        return tls.ssl.selected_alpn_protocol()

    async def intercept_tls(self, peek: Peek) -> None:
        ctx, up = self.ctx, self.up
        if not usable_sni(ctx, peek.sni, up.address):
            return
        name = self.dest.server_name(peek.sni)
        offered = peek.alpn
        upstream_error: UpstreamError | None = None

        async def offer() -> tuple[str, ...]:
            # ALPN is settled upstream first, so that both sides speak the same protocol.
            nonlocal upstream_error
            try:
                chosen = await self._upstream_tls(name, offered)
            except UpstreamError as e:
                upstream_error = e
                ctx.error(e.stage, e.message, address=up.address)  # type: ignore[arg-type]
                up.release()
                chosen = None
            return (chosen,) if chosen else ((HTTP1_ALPN,) if HTTP1_ALPN in offered else ())

        tls = ClientTLS(ctx, self.client, name, up.address, peek.sni)
        ctls = await tls.handshake(offer)
        if ctls is None:
            up.release()
            await tls.failed()
            return
        if upstream_error is not None:
            await answer_with_error(ctx, ctls, upstream_error)
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

            try:
                await H2Bridge(self.ctx, ctls, self.up, scheme, name,
                               self.dest.authority).run()
            finally:
                self.up.release()
            return
        # Reconnects for HTTP/1 clients must not end up speaking h2 upstream.
        await self._http1(ctls, scheme, name,
                          (HTTP1_ALPN,) if HTTP1_ALPN in offered else ())

    async def _http1(self, client: Stream, scheme: str, name: str,
                     alpn: tuple[str, ...]) -> None:
        """HTTP/1 requests from the client, all to the destination."""
        dest = self.dest
        tls = (name, alpn) if self.up.tls else None  # how to reconnect
        target = Target(scheme, name, dest.port, self.up, tls, dest.authority)
        try:
            await serve_http1(self.ctx, client, target)
        finally:
            target.upstream.release()
