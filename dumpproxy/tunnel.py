"""Tunnels: CONNECT answered, then the path every mode shares once the destination is known.

A tunnel is a client stream with a known destination and an open upstream connection
(CONNECT today; SOCKS5, transparent and reverse later): peek at the client's first bytes,
decide, then either relay verbatim (passthrough) or intercept (TLS termination, then the
HTTP/1 or HTTP/2 bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import time
from collections.abc import Callable, Iterator

import h11

from dumpproxy import auth
from dumpproxy.addresses import BadHost, check_host, join_host_port, split_host_port
from dumpproxy.clienthello import Peek, classify
from dumpproxy.context import Context
from dumpproxy.hostfilter import candidates
from dumpproxy.http1 import answer_error, error_response, next_event, send
from dumpproxy.http1_server import Connect, Target, serve_http1
from dumpproxy.relay import Relay, RelayIdle
from dumpproxy.streams import SocketStream, Stream, StreamTimeout, TLSStream
from dumpproxy.upstream import OUT_OF_DESCRIPTORS, Upstream, UpstreamError

# A client that closes this soon after the handshake, having sent nothing, may have
# rejected the certificate: GnuTLS clients (wget, git) check it only once the handshake is
# done, and then close without an alert.
SILENT_REJECT_WINDOW = 2.0
# How long what a client showed about trusting the CA counts for its server name, and how
# long an ended connection waits for a sibling still on its way (see ClientTrust.settle).
TRUST_MEMORY = 60.0
SIBLING_WAIT = 1.0
SIBLING_POLL = 0.02
HTTP1_ALPN = "http/1.1"
H2_ALPN = "h2"
SUPPORTED_ALPN = (H2_ALPN, HTTP1_ALPN)


class ClientTrust:
    """What recent client connections showed about trusting the CA, per server name.

    A connection that ends without an alert, mid-handshake (Node rejects that way) or
    right after it without a request (GnuTLS clients do), is either a rejection or a
    browser's spare connection, dropped once a sibling connection to the same name is up.
    The sibling tells them apart: a handshake with the same name completed (mid-handshake
    drops), or a connection to it carried requests (drops after the handshake)."""

    def __init__(self) -> None:
        self._handshakes: dict[str, float] = {}  # name -> last completed handshake
        self._proven: dict[str, float] = {}  # name -> last connection that carried data
        self._live: dict[str, set[TLSStream]] = {}
        self._handshaking: dict[str, int] = {}  # name -> handshakes under way

    @contextlib.contextmanager
    def handshaking(self, name: str) -> Iterator[None]:
        """A handshake with the client for `name` is under way (a sibling in the making)."""
        self._handshaking[name] = self._handshaking.get(name, 0) + 1
        try:
            yield
        finally:
            left = self._handshaking[name] - 1
            if left:
                self._handshaking[name] = left
            else:
                del self._handshaking[name]

    def _pending(self, name: str) -> bool:
        """A sibling may still show trust: it is in its handshake, or up without a request."""
        return name in self._handshaking or any(not s.bytes_in for s in self._live.get(name, ()))

    async def settle(self, name: str, shown: Callable[[], bool]) -> bool:
        """Whether trust is `shown` for `name`, waiting (at most SIBLING_WAIT) only while a
        sibling connection may still show it. A lone client learns of its rejection at
        once; a browser's spare, dropped while its sibling finishes, is not blamed."""
        deadline = time.monotonic() + SIBLING_WAIT
        while not shown() and self._pending(name) and time.monotonic() < deadline:
            await asyncio.sleep(SIBLING_POLL)
        return shown()

    def _prune(self, table: dict[str, float], now: float) -> None:
        if len(table) > 4096:
            for name in [n for n, t in table.items() if now - t > TRUST_MEMORY]:
                del table[name]

    def handshake_done(self, name: str, ctls: TLSStream) -> None:
        now = time.monotonic()
        self._prune(self._handshakes, now)
        self._handshakes[name] = now
        self._live.setdefault(name, set()).add(ctls)

    def closed(self, name: str, ctls: TLSStream) -> None:
        live = self._live.get(name)
        if live is not None:
            live.discard(ctls)
            if not live:
                del self._live[name]
        if ctls.bytes_in:
            now = time.monotonic()
            self._prune(self._proven, now)
            self._proven[name] = now

    def handshaken(self, name: str) -> bool:
        return time.monotonic() - self._handshakes.get(name, -TRUST_MEMORY) < TRUST_MEMORY

    def proven(self, name: str) -> bool:
        if any(s.bytes_in for s in self._live.get(name, ())):
            return True
        return time.monotonic() - self._proven.get(name, -TRUST_MEMORY) < TRUST_MEMORY


TRUST = ClientTrust()  # one per process, like the proxy


def client_dropped(e: BaseException) -> bool:
    """The client ended the connection mid-handshake without an alert (EOF or reset)."""
    if isinstance(e, (ssl.SSLEOFError, ConnectionError)):
        return True
    return isinstance(e, ssl.SSLError) and e.reason == "UNEXPECTED_EOF_WHILE_READING"


def client_tls_message(e: BaseException | None, ca_path: str, silent: bool = False) -> str:
    what = getattr(e, "reason", None) or str(e) or type(e).__name__
    hint = (
        f"trust the dumpproxy CA ({ca_path}; `dumpproxy --print-ca` prints it): "
        "curl --cacert FILE, SSL_CERT_FILE / REQUESTS_CA_BUNDLE for Python, "
        "NODE_EXTRA_CA_CERTS for Node, or add it to the system store"
    )
    if silent:
        return ("the client closed the connection right after the TLS handshake without a "
                "request; if it rejected the certificate (GnuTLS clients such as wget and git "
                f"do that without an alert: wget --ca-certificate FILE, GIT_SSL_CAINFO), {hint}")
    if isinstance(e, ssl.SSLError) and any(
        k in what.upper() for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                    "DECRYPT_ERROR", "ACCESS_DENIED")
    ):
        return f"the client does not trust the dumpproxy CA ({what}); {hint}"
    return (f"TLS handshake with the client failed ({what}); if the client rejected the "
            f"certificate, {hint}")


async def serve_connect(ctx: Context, client: SocketStream, connect: Connect) -> None:
    """CONNECT: check credentials and target, connect upstream first, answer 200, then run
    the tunnel."""
    h, req = connect.h, connect.request
    services = ctx.services
    reply = None
    if services.auth is not None and not services.auth.check_basic(
            list(req.headers.raw_items())):
        ctx.error("auth", "proxy authentication required")
        reply = (407, "Proxy authentication required")
    else:
        try:
            host, port = split_host_port(req.target.decode("latin-1"))
            check_host(host)
        except ValueError as e:
            ctx.error("http", f"bad CONNECT target: {e}")
            reply = (400, f"Bad CONNECT target: {e}")
        else:
            try:
                up = await ctx.open_upstream(host, port)
            except UpstreamError as e:
                ctx.error(e.stage, e.message, address=join_host_port(host, port))  # type: ignore
                reply = (e.status, e.message)
    if reply is not None:
        status, message = reply
        answer_error(h, client, status, message, auth.CHALLENGE if status == 407 else ())
        return
    try:
        send(h, client, h11.Response(status_code=200, headers=[],
                                     reason=b"Connection established"))
    except ConnectionError:
        up.close()
        return
    client.unread(h.trailing_data[0])
    try:
        await Tunnel(ctx, client, up, host, port).run()
    finally:
        up.close()


async def peek_first_bytes(stream: Stream, deadline: float) -> tuple[bytes, Peek]:
    """A client's first bytes, until classify() is complete, EOF, an error or the deadline
    (time.monotonic()); they stay unread in the stream for TLS or the relay."""
    data = b""
    peek = classify(data)
    while not peek.complete:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            chunk = await stream.read(remaining)
        except (StreamTimeout, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
        peek = classify(data)
    stream.unread(data)
    return data, peek


def usable_sni(ctx: Context, sni: str | None, address: str) -> bool:
    """False (and an error event) when the client's SNI cannot name a host: no leaf
    certificate or upstream TLS can be made for it."""
    if sni:
        try:
            check_host(sni)
        except BadHost as e:
            ctx.error("client_tls", f"the client's TLS server name (SNI): {e}", address=address)
            return False
    return True


def leaf_context(ctx: Context, name: str, alpn: tuple[str, ...], address: str):
    """The dumpproxy CA's leaf for name, or None (and an error event) without one."""
    try:
        return ctx.services.certs.server_context(name, alpn)
    except OSError as e:  # loading the leaf needs a descriptor, like everything else
        why = OUT_OF_DESCRIPTORS if e.errno in (errno.EMFILE, errno.ENFILE) else e
        ctx.error("client_tls", f"no certificate for {name}: {why}", address=address)
        return None


class Tunnel:
    def __init__(self, ctx: Context, client: SocketStream, up: Upstream, host: str, port: int):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.client = client
        self.up = up
        self.host = host
        self.port = port
        self.opened = time.monotonic()

    async def _peek(self) -> tuple[bytes, Peek]:
        # No longer than the head timeout: a silent client is cut by then anyway.
        return await peek_first_bytes(self.client, min(
            time.monotonic() + self.cfg.peek_timeout, self.opened + self.cfg.head_timeout))

    async def run(self) -> None:
        """Peek, decide, then relay or intercept (TLS, or plaintext HTTP/1)."""
        if self.ctx.services.filter.empty:  # nothing could change the outcome: decide now
            decision = self.ctx.decide(
                self.host, self.port, candidates(self.host, self.port, ip=self.up.ip_host), None
            )
            data, peek = await self._peek()  # still needed: TLS or plaintext, and the SNI
        else:
            data, peek = await self._peek()
            decision = self.ctx.decide(self.host, self.port, self.candidates(peek), peek.sni)
        if not data:  # a silent client (or a server-first protocol): the head timeout holds
            left = self.cfg.head_timeout - (time.monotonic() - self.opened)
            await self.relay(first_timeout=max(left, 0.001))
        elif decision.passthrough or peek.kind in ("other", "h2c"):
            await self.relay()
        elif peek.kind == "tls":
            await self.intercept_tls(peek)
        else:
            await self.serve_plain()

    def candidates(self, peek: Peek) -> list[str]:
        return candidates(self.host, self.port, ip=self.up.ip_host, sni=peek.sni,
                          host_header=peek.host)

    async def serve_plain(self) -> None:
        """Plaintext HTTP/1 inside the tunnel, to its fixed destination."""
        await serve_http1(self.ctx, self.client, Target("http", self.host, self.port, self.up))

    async def relay(self, first_timeout: float | None = None) -> None:
        relay = Relay(self.client, self.up.stream, self.cfg.idle_timeout, first_timeout)
        try:
            await relay.run()
        except RelayIdle as e:
            why = str(e)
            if first_timeout is not None and not (relay.to_server or relay.to_client):
                why = f"no data from either side within {self.cfg.head_timeout:g} s"
            self.ctx.error("relay", f"tunnel to {self.up.address} closed: {why}",
                           address=self.up.address)
        except (ConnectionError, OSError) as e:
            if not relay.teardown(e):  # else: recorded on the disconnect events (`how`)
                self.ctx.error("relay", f"tunnel to {self.up.address} reset: {e}",
                              address=self.up.address)
        except Exception as e:
            self.ctx.error("relay", f"tunnel to {self.up.address} closed: {e}",
                          address=self.up.address)
        finally:
            self.up.close()

    async def intercept_tls(self, peek: Peek) -> None:
        ctx = self.ctx
        if not usable_sni(ctx, peek.sni, self.up.address):
            return
        server_name = peek.sni or self.host
        with TRUST.handshaking(server_name):
            ctls, upstream_error, failure = await self._terminate_tls(peek, server_name)
        if failure is not None:
            # a client that dropped while a sibling trusted the CA: a spare connection
            # (client_disconnect says how it ended); anything else is a rejection
            if not client_dropped(failure) or not await TRUST.settle(
                    server_name, lambda: TRUST.handshaken(server_name)):
                ctx.error("client_tls", client_tls_message(
                    failure, ctx.services.certs.ca.cert_path), address=self.up.address)
            return
        if ctls is None:
            return
        ctx.emit("tls", ctls.event("client", self.up.address, peek.sni))
        if upstream_error is not None:
            await answer_with_error(ctx, ctls, upstream_error)
            return
        TRUST.handshake_done(server_name, ctls)
        handshake_done = time.monotonic()
        try:
            await self._bridge(ctls, server_name, peek.alpn)
        finally:
            TRUST.closed(server_name, ctls)
            ended = self.client.ended
            if ended != "peer_reset":
                ctls.write_eof()  # close_notify, then FIN: an orderly close
        if (ctls.bytes_in == 0 and ended in ("peer_closed", "peer_reset")
                and time.monotonic() - handshake_done < SILENT_REJECT_WINDOW):
            await self._silent_close(server_name)

    async def _terminate_tls(self, peek: Peek, server_name: str) -> tuple[
            TLSStream | None, UpstreamError | None, BaseException | None]:
        """The handshake with the client, after the upstream one: (the client's TLS stream,
        the upstream failure to answer it with, the client handshake's failure)."""
        ctx = self.ctx
        offered = peek.alpn
        # ALPN is settled upstream first, so that both sides speak the same protocol.
        upstream_error: UpstreamError | None = None
        try:
            chosen = await self.upstream_tls(server_name,
                                             tuple(p for p in offered if p in SUPPORTED_ALPN))
        except UpstreamError as e:
            upstream_error = e
            ctx.error(e.stage, e.message, address=self.up.address)  # type: ignore[arg-type]
            self.up.close()
            chosen = None
        client_alpn = (chosen,) if chosen else ((HTTP1_ALPN,) if HTTP1_ALPN in offered else ())
        server_ctx = leaf_context(ctx, server_name, client_alpn, self.up.address)
        if server_ctx is None:
            self.up.close()
            return None, None, None
        try:
            ctls = await TLSStream.handshake(self.client, server_ctx, server_side=True,
                                             timeout=self.cfg.peek_timeout)
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            self.up.close()
            return None, upstream_error, e
        return ctls, upstream_error, None

    async def _silent_close(self, server_name: str) -> None:
        """The client closed right after the handshake without a request: a rejection
        (GnuTLS), unless a sibling connection carried requests (see ClientTrust)."""
        if not await TRUST.settle(server_name, lambda: TRUST.proven(server_name)):
            self.ctx.error("client_tls", client_tls_message(
                None, self.ctx.services.certs.ca.cert_path, silent=True),
                address=self.up.address)

    async def upstream_tls(self, server_name: str, alpn: tuple[str, ...]) -> str | None:
        """TLS with the destination before the client's handshake; the ALPN it chose."""
        tls = await self.up.start_tls(server_name, alpn)
        return tls.ssl.selected_alpn_protocol()

    async def _bridge(self, ctls: TLSStream, server_name: str, offered: tuple) -> None:
        """The intercepted client's HTTP/2 or HTTP/1 to the destination."""
        ctx = self.ctx
        if ctls.ssl.selected_alpn_protocol() == H2_ALPN:
            from dumpproxy.http2 import H2Bridge  # h2 costs startup time: load on first use

            try:
                await H2Bridge(ctx, ctls, self.up, "https", server_name).run()
            finally:
                self.up.close()
            return
        # Reconnects for HTTP/1 clients must not end up speaking h2 upstream.
        alpn = (HTTP1_ALPN,) if HTTP1_ALPN in offered else ()
        target = Target("https", server_name, self.port, self.up, (server_name, alpn))
        try:
            await serve_http1(ctx, ctls, target)
        finally:
            target.upstream.close()


async def answer_with_error(ctx: Context, stream, err: UpstreamError) -> None:
    """Give the client's first request a readable error (e.g. upstream TLS failed)."""
    h = h11.Connection(h11.SERVER)
    try:
        ev = await next_event(h, stream, ctx.cfg.head_timeout)
        if type(ev) is h11.Request:
            for event in error_response(err.status, err.message):
                send(h, stream, event)
            await stream.drain()
            stream.write_eof()
    except (h11.ProtocolError, ConnectionError, StreamTimeout, asyncio.TimeoutError):
        pass
