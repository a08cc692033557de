"""A tunnel: a client stream with a known destination and an open upstream connection.

This is the one path every mode shares once the destination is known (CONNECT today;
SOCKS5, transparent and reverse later): peek at the client's first bytes, decide, then
either relay verbatim (passthrough) or intercept (TLS termination and/or the HTTP bridge).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING

import h11

from dumpproxy.clienthello import Peek, classify
from dumpproxy.hostfilter import candidates
from dumpproxy.http1 import Target, error_response, next_event, send, serve_http1
from dumpproxy.relay import Relay
from dumpproxy.streams import SocketStream, StreamTimeout, TLSStream
from dumpproxy.upstream import Upstream, UpstreamError

if TYPE_CHECKING:
    from dumpproxy.proxy import ClientConn

HTTP1_ALPN = "http/1.1"
H2_ALPN = "h2"
SUPPORTED_ALPN = (H2_ALPN, HTTP1_ALPN)


def client_tls_message(e: BaseException, ca_path: str) -> str:
    what = getattr(e, "reason", None) or str(e) or type(e).__name__
    hint = (
        f"trust the dumpproxy CA ({ca_path}; `dumpproxy --print-ca` prints it): "
        "curl --cacert FILE, SSL_CERT_FILE / REQUESTS_CA_BUNDLE for Python, "
        "NODE_EXTRA_CA_CERTS for Node, or add it to the system store"
    )
    if isinstance(e, ssl.SSLError) and any(
        k in what.upper() for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                                    "DECRYPT_ERROR", "ACCESS_DENIED")
    ):
        return f"the client does not trust the dumpproxy CA ({what}); {hint}"
    return (f"TLS handshake with the client failed ({what}); if the client rejected the "
            f"certificate, {hint}")


class Tunnel:
    def __init__(self, cc: ClientConn, client: SocketStream, up: Upstream, host: str, port: int):
        self.cc = cc
        self.proxy = cc.proxy
        self.client = client
        self.up = up
        self.host = host
        self.port = port

    async def _peek(self) -> tuple[bytes, Peek]:
        """Read the client's first bytes: until classify() is complete, EOF or the timeout."""
        data = b""
        peek = classify(data)
        deadline = time.monotonic() + self.proxy.cfg.peek_timeout
        while not peek.complete:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                chunk = await self.client.read(remaining)
            except StreamTimeout:
                break
            if not chunk:
                break
            data += chunk
            peek = classify(data)
        return data, peek

    async def run(self) -> None:
        hf = self.proxy.filter
        if hf.empty:  # nothing could change the outcome: decide without waiting
            decision = self.cc.decide(
                self.host, self.port, candidates(self.host, self.port, ip=self.up.ip_host), None
            )
            data, peek = await self._peek()  # still needed: TLS or plaintext, and the SNI
        else:
            data, peek = await self._peek()
            decision = self.cc.decide(
                self.host, self.port,
                candidates(self.host, self.port, ip=self.up.ip_host, sni=peek.sni,
                           host_header=peek.host),
                peek.sni,
            )
        self.client.unread(data)
        if decision.passthrough or peek.kind in ("other", "h2c") or not data:
            await self.relay()
        elif peek.kind == "tls":
            await self.intercept_tls(peek)
        else:
            target = Target("http", self.host, self.port, self.up)
            await serve_http1(self.cc, self.client, target)

    async def relay(self) -> None:
        relay = Relay(self.client, self.up.stream, self.proxy.cfg.idle_timeout)
        try:
            await relay.run()
        except (ConnectionError, OSError) as e:
            self.cc.error("relay", f"tunnel to {self.up.address} reset: {e}",
                          address=self.up.address)
        except Exception as e:
            self.cc.error("relay", f"tunnel to {self.up.address} closed: {e}",
                          address=self.up.address)
        finally:
            self.up.close()

    async def intercept_tls(self, peek: Peek) -> None:
        cfg = self.proxy.cfg
        server_name = peek.sni or self.host
        offered = peek.alpn
        # ALPN is settled upstream first, so that both sides speak the same protocol.
        up_alpn = tuple(p for p in offered if p in SUPPORTED_ALPN)
        upstream_error: UpstreamError | None = None
        try:
            tls = await self.up.start_tls(server_name, up_alpn)
            chosen = tls.ssl.selected_alpn_protocol()
        except UpstreamError as e:
            upstream_error = e
            self.cc.error(e.stage, e.message, address=self.up.address)
            self.up.close()
            chosen = None
        client_alpn = (chosen,) if chosen else ((HTTP1_ALPN,) if HTTP1_ALPN in offered else ())
        ctx = self.proxy.certs.server_context(server_name, client_alpn)
        try:
            ctls = await TLSStream.handshake(self.client, ctx, server_side=True,
                                             timeout=cfg.peek_timeout)
        except (ssl.SSLError, ConnectionError, StreamTimeout, OSError) as e:
            self.cc.error("client_tls", client_tls_message(e, self.proxy.certs.ca.cert_path),
                          address=self.up.address)
            self.up.close()
            return
        self.proxy.emit(
            "tls", {"side": "client", "address": self.up.address, "sni": peek.sni, **ctls.info()},
            self.cc,
        )
        if upstream_error is not None:
            await answer_with_error(self.cc, ctls, upstream_error)
            return
        if ctls.ssl.selected_alpn_protocol() == H2_ALPN:
            from dumpproxy.http2 import H2Bridge  # h2 costs startup time: load on first use

            try:
                await H2Bridge(self.cc, ctls, self.up, "https", server_name).run()
            finally:
                self.up.close()
            return
        # Reconnects for HTTP/1 clients must not end up speaking h2 upstream.
        alpn = (HTTP1_ALPN,) if HTTP1_ALPN in offered else ()
        target = Target("https", server_name, self.port, self.up, (server_name, alpn))
        try:
            await serve_http1(self.cc, ctls, target)
        finally:
            target.upstream.close()


async def answer_with_error(cc: ClientConn, stream, err: UpstreamError) -> None:
    """Give the client's first request a readable error (e.g. upstream TLS failed)."""
    h = h11.Connection(h11.SERVER)
    try:
        ev = await next_event(h, stream, cc.proxy.cfg.client_idle_timeout)
        if type(ev) is h11.Request:
            for event in error_response(err.status, err.message):
                send(h, stream, event)
            await stream.drain()
            stream.write_eof()
    except (h11.ProtocolError, ConnectionError, StreamTimeout, asyncio.TimeoutError):
        pass
