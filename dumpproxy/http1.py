"""The HTTP/1 bridge: requests read from a client with h11, forwarded upstream with h11.

One bridge serves every place HTTP/1 appears: absolute-form requests to the explicit
proxy (each decided on its own), and origin-form requests inside an intercepted tunnel
(the tunnel was decided at CONNECT; its destination is fixed). Bodies stream through in
both directions; nothing is held whole.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h11

from dumpproxy import headers as hdr
from dumpproxy.flows import DEFAULT_PORTS, Flow
from dumpproxy.hostfilter import candidates, join_host_port
from dumpproxy.relay import Relay
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import Upstream, UpstreamError

if TYPE_CHECKING:
    from dumpproxy.proxy import ClientConn

MAX_HEAD = 64 * 1024


class ClientGone(Exception):
    """The client closed or reset its connection mid-exchange."""


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def next_event(h: h11.Connection, stream: Stream, timeout: float | None):
    """The next h11 event, reading from the stream as needed (b"" feeds EOF).

    The timeout bounds the whole event (a head trickled a byte at a time included),
    not each read."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ev = h.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise StreamTimeout()
        h.receive_data(await stream.read(remaining))


def send(h: h11.Connection, stream: Stream, event) -> None:
    data = h.send(event)
    if data:
        stream.write(data)


AUTH_CHALLENGE = ((b"proxy-authenticate", b'Basic realm="dumpproxy"'),)


def error_response(status: int, message: str, extra: tuple = ()) -> list:
    """The h11 events of a short text/plain answer made by dumpproxy itself."""
    body = (message.rstrip("\n") + "\n").encode()
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    head = h11.Response(
        status_code=status,
        reason=reason,
        headers=[
            *extra,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    return [head, h11.Data(data=body), h11.EndOfMessage()]


def answer_error(h: h11.Connection, client: Stream, status: int, message: str,
                 extra: tuple = ()) -> None:
    """Best effort error answer; the connection is closed after it."""
    if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        for event in error_response(status, message, extra):
            send(h, client, event)
    except (h11.LocalProtocolError, ConnectionError):
        pass


def protocol_error_text(e: h11.ProtocolError, redact: bool) -> str:
    """h11's message, whose quoted raw line may carry credentials (a malformed
    `Authorization` line): withheld unless --no-redact; a bytearray repr made readable."""
    text = str(e)
    if redact:
        cut = re.search(r": (bytearray\()?b['\"]", text)
        if cut:
            return text[: cut.start()] + " (raw bytes withheld; --no-redact shows them)"
        return text
    return re.sub(r"bytearray\((b'.*?')\)", r"\1", text)


def _target_text(raw: str, redact: bool) -> str:
    return repr(re.sub(r"//[^/@]*@", "//<redacted>@", raw) if redact else raw)


@dataclass
class Target:
    """A fixed destination (inside a tunnel): every request goes there."""

    scheme: str
    host: str  # as named in URLs and events (the SNI, else the CONNECT host)
    port: int
    upstream: Upstream  # the current connection; a reconnect goes where it went
    tls: tuple[str, tuple[str, ...]] | None = None  # (server name, ALPN offer) to reconnect

    async def connection(self, cc: ClientConn) -> Upstream:
        up = self.upstream
        if not up.reusable:
            up.close()
            self.upstream = up = await Upstream.open(cc, up.host, up.port, self.tls)
        return up


async def serve_http1(cc: ClientConn, client: Stream, target: Target | None) -> None:
    """Serve HTTP/1 requests from one client stream until it closes.

    target None: explicit proxy (absolute-form, decided per request, CONNECT allowed).
    """
    h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    cfg = cc.proxy.cfg
    while True:
        try:
            ev = await next_event(h, client, cfg.client_idle_timeout)
        except StreamTimeout:
            if h.their_state is not h11.IDLE or h.trailing_data[0]:
                cc.error("http", f"no complete request head within {cfg.client_idle_timeout:g} s")
            return
        except h11.RemoteProtocolError as e:
            text = protocol_error_text(e, cfg.redact)
            cc.error("http", f"malformed request: {text}")
            answer_error(h, client, e.error_status_hint or 400, f"Bad request: {text}")
            return
        except ConnectionError:
            return
        if type(ev) is not h11.Request:  # ConnectionClosed (clean EOF)
            return
        if target is None and ev.method == b"CONNECT":
            await cc.connect_tunnel(h, client, ev)
            return
        keep = await Exchange(cc, h, client, ev, target).run()
        if not keep or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return
        h.start_next_cycle()


class Exchange:
    """One request/response through the bridge."""

    def __init__(self, cc: ClientConn, h: h11.Connection, client: Stream, req: h11.Request,
                 target: Target | None):
        self.cc = cc
        self.proxy = cc.proxy
        self.h = h
        self.client = client
        self.req = req
        self.target = target
        self.record = True
        self.fl: Flow | None = None  # set when the exchange is recorded
        self.started = time.monotonic()
        self.status: int | None = None
        self.sent_head = False

    # -- request line and destination --
    def _destination(self) -> tuple[str, str, int, str]:
        """scheme, host, port, origin-form path."""
        raw = self.req.target.decode("latin-1")
        if self.target is not None and raw.startswith("/"):
            t = self.target
            return t.scheme, t.host, t.port, raw
        if self.target is None and raw.startswith("/"):
            raise BadRequest(
                "dumpproxy is a proxy: send absolute-form requests (GET http://host/ HTTP/1.1)"
            )
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as e:
            raise BadRequest(
                f"bad request target {_target_text(raw, self.proxy.cfg.redact)}: {e}"
            ) from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise BadRequest(
                f"unsupported request target {_target_text(raw, self.proxy.cfg.redact)}")
        if self.target is not None:  # absolute-form inside a tunnel: the tunnel decides
            t = self.target
            scheme, host, port = t.scheme, t.host, t.port
        else:
            host = parts.hostname
            port = port or DEFAULT_PORTS[scheme]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return scheme, host, port, path

    async def run(self) -> bool:
        """Forward the exchange; True when the client connection may be kept alive."""
        req = self.req
        items = list(req.headers.raw_items())
        try:
            if self.target is None and not self.proxy.authorized(items):
                self.cc.error("auth", "proxy authentication required")
                return self._reply_407()
            if hdr.header_value(items, b"transfer-encoding") is not None and \
                    hdr.header_value(items, b"content-length") is not None:
                raise BadRequest("request has both Content-Length and Transfer-Encoding")
            scheme, host, port, path = self._destination()
        except BadRequest as e:
            self.cc.error("http", str(e))
            self._fail(e.status, str(e))
            return False
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        try:
            up = await self._upstream()
        except UpstreamError as e:
            self.cc.error(e.stage, e.message, address=join_host_port(host, port),
                          flow=self.flow_id)
            self._fail(e.status, e.message)
            return False
        try:
            return await self._forward(up, items)
        except asyncio.CancelledError:
            self.cc.error("shutdown", "proxy shutting down mid-exchange", flow=self.flow_id,
                          address=up.address)
            up.close()
            raise

    async def _upstream(self) -> Upstream:
        if self.target is not None:
            up = await self.target.connection(self.cc)
            self._begin()
            return up
        up = await self.cc.upstream_for(self.scheme, self.host, self.port)
        decision = self.cc.decide(
            self.host, self.port, candidates(self.host, self.port, ip=up.ip_host), sni=None
        )
        self.record = not decision.passthrough
        self._begin()
        return up

    def _begin(self) -> None:
        """Count the request; number it and write `request` if it is recorded."""
        self.proxy.stats_requests += 1
        if self.record:
            req = self.req
            self.fl = Flow(self.cc, req.method.decode("latin-1"), self.scheme, self.host,
                           self.port, self.path, "HTTP/" + req.http_version.decode(),
                           req.headers.raw_items(), self.started)

    @property
    def flow_id(self) -> int | None:
        return self.fl.flow if self.fl is not None else None

    # -- forwarding; failures are attributed to the side they came from --
    def _to_client(self, event) -> None:
        try:
            send(self.h, self.client, event)
        except ConnectionError as e:
            raise ClientGone(str(e)) from None

    def _to_up(self, up: Upstream, event) -> None:
        try:
            send(up.h, up.stream, event)  # type: ignore[arg-type]
        except ConnectionError as e:
            raise UpstreamGone(str(e)) from None

    def _client_event(self):
        try:
            return self.h.next_event()
        except h11.RemoteProtocolError as e:
            raise ClientGone(f"malformed request body: {e}") from None

    async def _forward(self, up: Upstream, items: list[tuple[bytes, bytes]]) -> bool:
        req = self.req
        upgrade = hdr.header_value(items, b"upgrade") is not None and hdr.has_token(
            items, b"connection", b"upgrade"
        )
        out = hdr.forwardable(items, keep_upgrade=upgrade)
        if hdr.header_value(out, b"host") is None:
            out.insert(0, (b"Host", join_host_port(self.host, self.port).encode()))
        if up.h is None:
            up.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        upload: asyncio.Task | None = None
        try:
            # _parsed: the fields came out of h11's parser (already validated); skip the
            # per-field regexes, the largest cost of a small exchange.
            self._to_up(up, h11.Request(method=req.method, target=self.path.encode(),
                                        headers=out, _parsed=True))
            first = self._client_event()
            if type(first) is h11.EndOfMessage:
                self._to_up(up, h11.EndOfMessage())
            else:
                upload = asyncio.ensure_future(self._upload(up, first))
            try:
                await up.stream.drain()
            except ConnectionError as e:
                raise UpstreamGone(str(e)) from None
            keep = await self._download(up, upgrade, upload)
        except BaseException as e:
            if upload is not None and not upload.done():
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
            if isinstance(e, asyncio.CancelledError):
                raise
            return self._broken(up, e)
        if upload is not None:
            if not upload.done():
                # The response ended before the request body: stop, close both.
                upload.cancel()
                await asyncio.gather(upload, return_exceptions=True)
                keep = False
            elif upload.exception() is not None:
                return self._broken(up, upload.exception())  # type: ignore[arg-type]
        return keep

    def _broken(self, up: Upstream, e: BaseException) -> bool:
        """Something failed mid-exchange: answer if we still can, record, close."""
        up.close()
        if isinstance(e, ClientGone):
            self.cc.error("client", f"client connection lost: {e}", flow=self.flow_id,
                          address=up.address)
            return False
        if isinstance(e, StreamTimeout):
            status = 504
            msg = (
                f"no response from {up.address} within {self.proxy.cfg.response_timeout:g} s"
                if not self.sent_head else f"{up.address} stalled mid-response"
            )
        elif isinstance(e, h11.RemoteProtocolError):
            status, msg = 502, f"malformed response from {up.address}: {e}"
        elif isinstance(e, BadResponse):
            status, msg = 502, str(e)
        elif isinstance(e, UpstreamGone):
            status, msg = 502, f"{up.address} closed the connection: {e}"
        else:
            status, msg = 502, f"error talking to {up.address}: {e!r}"
        self.cc.error("upstream", msg, flow=self.flow_id, address=up.address)
        if not self.sent_head:
            self._fail(status, msg)
        else:
            self.client.abort()
        return False

    async def _upload(self, up: Upstream, ev) -> None:
        """Client body -> upstream, streamed."""
        cfg = self.proxy.cfg
        while True:
            if ev is h11.NEED_DATA:
                try:
                    data = await self.client.read(cfg.idle_timeout)
                except (StreamTimeout, ConnectionError) as e:
                    raise ClientGone(f"request body interrupted: {e!r}") from None
                self.h.receive_data(data)
            elif type(ev) is h11.Data:
                if self.fl is not None:
                    self.fl.request_data(ev.data)
                self._to_up(up, ev)
                try:
                    await up.stream.drain()
                except ConnectionError as e:
                    raise UpstreamGone(str(e)) from None
            elif type(ev) is h11.EndOfMessage:
                self._to_up(up, ev)
                return
            elif type(ev) is h11.ConnectionClosed:
                raise ClientGone("closed before the request body ended")
            ev = self._client_event()

    async def _read_up(self, up: Upstream, timeout: float):
        try:
            ev = await next_event(up.h, up.stream, timeout)  # type: ignore[arg-type]
        except ConnectionError as e:
            raise UpstreamGone(str(e) or "connection reset") from None
        if type(ev) is h11.ConnectionClosed:
            raise UpstreamGone("connection closed before the response ended")
        return ev

    async def _download(self, up: Upstream, upgrade: bool,
                        upload: asyncio.Task | None) -> bool:
        """Upstream response -> client, streamed. Returns keep-alive."""
        client, cfg = self.client, self.proxy.cfg
        uh = up.h
        assert uh is not None
        while True:
            try:
                ev = await self._read_up(up, cfg.response_timeout)
            except StreamTimeout:
                if upload is not None and not upload.done():
                    continue  # the body is still going up: the wait counts from its end
                raise
            if type(ev) is h11.InformationalResponse:
                if ev.status_code == 101 and upgrade:
                    await self._switch(up, ev)
                    return False
                if self.req.http_version != b"1.0" and ev.status_code != 101:
                    self._to_client(h11.InformationalResponse(
                        status_code=ev.status_code, headers=hdr.forwardable(
                            list(ev.headers.raw_items())), reason=ev.reason))
                continue
            break
        resp: h11.Response = ev
        rh = list(resp.headers.raw_items())
        if hdr.header_value(rh, b"transfer-encoding") is not None and \
                hdr.header_value(rh, b"content-length") is not None:
            raise BadResponse(f"{up.address} sent both Content-Length and Transfer-Encoding")
        self.status = resp.status_code
        self._to_client(h11.Response(status_code=resp.status_code,
                                     headers=hdr.forwardable(rh), reason=resp.reason,
                                     _parsed=True))
        self.sent_head = True
        length = _plain_length(self.req.method, resp.status_code, rh)
        if length is not None:
            return await self._raw_body(up, resp, rh, length)
        trailers: list = []
        while True:
            ev = await self._read_up(up, cfg.idle_timeout)
            if type(ev) is h11.Data:
                if self.fl is not None:
                    self.fl.response_data(ev.data)
                self._to_client(ev)
                try:
                    await client.drain()
                except ConnectionError as e:
                    raise ClientGone(str(e)) from None
            elif type(ev) is h11.EndOfMessage:
                trailers = list(ev.headers.raw_items())
                break
        # Trailers need chunked framing towards the client (an HTTP/1.0 client gets a
        # close-delimited body); a failed h11.send would leave the connection in ERROR.
        if self.req.http_version == b"1.0" or not hdr.has_token(
                rh, b"transfer-encoding", b"chunked"):
            trailers = []
        self._to_client(h11.EndOfMessage(headers=trailers))
        self._respond_event(resp.reason, rh)
        if uh.our_state is h11.DONE and uh.their_state is h11.DONE:
            uh.start_next_cycle()
        else:
            up.close()
        return True

    async def _raw_body(self, up: Upstream, resp: h11.Response, rh: list, length: int) -> bool:
        """A Content-Length body, copied from the upstream socket to the client as read.

        h11 would copy every chunk three times (into its buffer, out of it, into the
        output); here the bytes go straight through. h11 still sees each chunk on the
        client side (no copy) so its state stays exact; the upstream side, whose state
        would only be discarded, gets a fresh h11 connection when the exchange ends.
        """
        h, client, idle = self.h, self.client, self.proxy.cfg.idle_timeout
        fl = self.fl
        left = length
        reusable = True
        data, _ = up.h.trailing_data  # type: ignore[union-attr]  # body bytes read with the head
        while left:
            if not data:
                try:
                    data = await up.stream.read(idle)
                except ConnectionError as e:
                    raise UpstreamGone(str(e) or "connection reset") from None
                if not data:
                    raise UpstreamGone("connection closed before the response ended")
            if len(data) > left:  # more than announced: never reuse this connection
                data = data[:left]
                reusable = False
            left -= len(data)
            if fl is not None:
                fl.response_data(data)
            try:
                for piece in h.send_with_data_passthrough(h11.Data(data=data)):  # type: ignore
                    client.write(piece)
                await client.drain()
            except ConnectionError as e:
                raise ClientGone(str(e)) from None
            data = b""
        self._to_client(h11.EndOfMessage())
        self._respond_event(resp.reason, rh)
        if reusable and resp.http_version >= b"1.1" and not hdr.has_token(
                rh, b"connection", b"close"):
            up.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        else:
            up.close()
        return True

    async def _switch(self, up: Upstream, ev: h11.InformationalResponse) -> None:
        """101 Switching Protocols: answer the client, then relay bytes both ways."""
        rh = list(ev.headers.raw_items())
        send(self.h, self.client, h11.InformationalResponse(
            status_code=101, headers=hdr.forwardable(rh, keep_upgrade=True), reason=ev.reason))
        self.status = 101
        self.sent_head = True
        self._respond_event(ev.reason, rh)
        self.client.unread(self.h.trailing_data[0])
        up.stream.unread(up.h.trailing_data[0])  # type: ignore[union-attr]
        relay = Relay(self.client, up.stream, self.proxy.cfg.idle_timeout)
        try:
            await relay.run()
        except Exception as e:  # reset or idle: the upgraded connection is over
            self.cc.error("upstream", f"upgraded connection ended: {e}", flow=self.flow_id,
                          address=up.address)
        finally:
            up.close()

    def _respond_event(self, reason: bytes, rh: list) -> None:
        if self.fl is not None:
            self.fl.respond(self.status, reason.decode("latin-1"), rh)  # type: ignore[arg-type]

    # -- local answers --
    def _fail(self, status: int, message: str) -> None:
        answer_error(self.h, self.client, status, message)

    def _reply_407(self) -> bool:
        answer_error(self.h, self.client, 407, "Proxy authentication required", AUTH_CHALLENGE)
        return False


def _plain_length(method: bytes, status: int, rh: list) -> int | None:
    """The body length when a response body is exactly Content-Length bytes, else None."""
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return None
    if hdr.header_value(rh, b"transfer-encoding") is not None:
        return None
    value = hdr.header_value(rh, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


class UpstreamGone(ConnectionError):
    """The upstream connection closed or reset mid-exchange."""


class BadResponse(Exception):
    pass
