"""The HTTP/1 pump: one exchange forwarded between a client and an upstream, both with h11.

The caller (`http1_server`) has already parsed the target, checked authentication,
decided, and opened the upstream; the pump sends the request, streams the bodies both
ways (nothing is held whole), relays an upgraded connection after 101, and maps every
failure, in one place, to the side it came from and to what the client is told.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time

import h11

from dumpproxy import headers as hdr
from dumpproxy.context import Context
from dumpproxy.flows import Flow
from dumpproxy.relay import Relay
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import Upstream

MAX_HEAD = 64 * 1024


# --- h11 helpers --------------------------------------------------------------------------


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


def error_response(status: int, message: str, extra: tuple = ()) -> list:
    """The h11 events of a short text/plain answer made by dumpproxy itself."""
    body = (message.rstrip("\n") + "\n").encode()
    head = h11.Response(
        status_code=status,
        reason=hdr.reason_phrase(status).encode(),
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


# --- failures, named for the side they came from ------------------------------------------


class PeerGone(Exception):
    """One side closed, reset or broke its connection mid-exchange."""


class ClientGone(PeerGone):
    pass


class UpstreamGone(PeerGone):
    pass


class BadResponse(Exception):
    pass


class _Blame:
    """`with TO_CLIENT:` turns a transport failure into the exception naming that side
    (httpcore's map_exceptions, as a cheap class: it wraps every chunk)."""

    __slots__ = ("exc",)

    def __init__(self, exc: type[PeerGone]):
        self.exc = exc

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, e, tb) -> bool:
        if tp is not None and issubclass(tp, ConnectionError):
            raise self.exc(str(e) or "connection reset") from None
        return False


TO_CLIENT = _Blame(ClientGone)
TO_UPSTREAM = _Blame(UpstreamGone)


class Phase(enum.Enum):
    """Where an exchange is; what a failure means for the client depends on it."""

    REQUEST = "waiting for the response head"  # the client can still get an error answer
    RESPONSE = "streaming the response"  # the head went out: a failure cuts the client
    UPGRADED = "relaying the upgraded connection"
    DONE = "done"


# --- the pump -----------------------------------------------------------------------------


class Exchange:
    """One request/response through the bridge."""

    def __init__(self, ctx: Context, h: h11.Connection, client: Stream, req: h11.Request,
                 up: Upstream, path: bytes, headers: list[tuple[bytes, bytes]],
                 upgrade: bool, fl: Flow | None):
        self.ctx = ctx
        self.h = h
        self.client = client
        self.req = req
        self.up = up
        self.path = path  # origin-form target sent upstream
        self.headers = headers  # forwardable request headers
        self.upgrade = upgrade
        self.fl = fl  # None when the exchange is not recorded
        self.phase = Phase.REQUEST
        self.status = 0

    @property
    def flow_id(self) -> int | None:
        return self.fl.flow if self.fl is not None else None

    async def run(self) -> bool:
        """Forward the exchange; True when the client connection may be kept alive."""
        up = self.up
        if up.h is None:
            up.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        upload: asyncio.Task | None = None
        try:
            with TO_UPSTREAM:
                # _parsed: the fields came out of h11's parser (already validated); skip
                # the per-field regexes, the largest cost of a small exchange.
                send(up.h, up.stream, h11.Request(
                    method=self.req.method, target=self.path, headers=self.headers,
                    _parsed=True))
            first = self._client_event()
            if type(first) is h11.EndOfMessage:
                with TO_UPSTREAM:
                    send(up.h, up.stream, first)
                    await up.stream.drain()
                return await self._download(None)
            upload = asyncio.ensure_future(self._upload(first))
            return await self._with_upload(upload)
        except asyncio.CancelledError:
            await _settle(upload)
            self.ctx.error("shutdown", "proxy shutting down mid-exchange", self.flow_id,
                           up.address)
            up.close()
            raise
        except Exception as e:
            await _settle(upload)
            return self._broken(e)

    async def _with_upload(self, upload: asyncio.Task) -> bool:
        """The response is read while the request body still goes up; whichever side
        fails first ends the exchange at once."""
        down = asyncio.ensure_future(self._download(upload))
        try:
            await asyncio.wait({down, upload}, return_when=asyncio.FIRST_COMPLETED)
            if not down.done():  # the body is up (or the client failed): the response next
                if upload.exception() is not None:
                    raise upload.exception()  # type: ignore[misc]
                await down
        except BaseException:
            await _settle(down)
            raise
        keep = down.result()
        if not upload.done():  # the response ended before the request body: close both
            await _settle(upload)
            self.up.close()  # its request was cut short: never reuse it
            return False
        if upload.exception() is not None:
            raise upload.exception()  # type: ignore[misc]
        return keep

    def _broken(self, e: BaseException) -> bool:
        """Something failed mid-exchange: record it, answer if we still can, close."""
        up, ctx = self.up, self.ctx
        up.close()
        if isinstance(e, ClientGone):
            ctx.error("client", f"client connection lost: {e}", self.flow_id, up.address)
            return False
        if isinstance(e, StreamTimeout):
            status = 504
            msg = (f"no response from {up.address} within {ctx.cfg.response_timeout:g} s"
                   if self.phase is Phase.REQUEST else f"{up.address} stalled mid-response")
        elif isinstance(e, h11.RemoteProtocolError):
            text = protocol_error_text(e, ctx.cfg.redact)  # the raw line may hold a cookie
            status, msg = 502, f"malformed response from {up.address}: {text}"
        elif isinstance(e, BadResponse):
            status, msg = 502, str(e)
        elif isinstance(e, UpstreamGone):
            status, msg = 502, f"{up.address} closed the connection: {e}"
        else:
            status, msg = 502, f"error talking to {up.address}: {e!r}"
        ctx.error("upstream", msg, self.flow_id, up.address)
        if self.phase is Phase.REQUEST:
            answer_error(self.h, self.client, status, msg)
        else:
            self.client.abort()
        return False

    # -- request side --
    def _client_event(self):
        try:
            return self.h.next_event()
        except h11.RemoteProtocolError as e:
            raise ClientGone(f"malformed request body: {e}") from None

    async def _upload(self, ev) -> None:
        """Client body -> upstream, streamed."""
        up, idle = self.up, self.ctx.cfg.idle_timeout
        while True:
            if ev is h11.NEED_DATA:
                try:
                    data = await self.client.read(idle)
                except (StreamTimeout, ConnectionError) as e:
                    raise ClientGone(f"request body interrupted: {e!r}") from None
                if not data:  # h11 would call this a malformed body; it is a departure
                    raise ClientGone("closed before the request body ended")
                self.h.receive_data(data)
            elif type(ev) is h11.Data:
                if self.fl is not None:
                    self.fl.request_data(ev.data)
                with TO_UPSTREAM:
                    send(up.h, up.stream, ev)  # type: ignore[arg-type]
                    await up.stream.drain()
            elif type(ev) is h11.EndOfMessage:
                with TO_UPSTREAM:
                    send(up.h, up.stream, ev)  # type: ignore[arg-type]
                return
            ev = self._client_event()

    # -- response side --
    def _to_client(self, event) -> None:
        with TO_CLIENT:
            send(self.h, self.client, event)

    async def _read_up(self, timeout: float):
        with TO_UPSTREAM:
            ev = await next_event(self.up.h, self.up.stream, timeout)  # type: ignore[arg-type]
        if type(ev) is h11.ConnectionClosed:
            raise UpstreamGone("connection closed before the response ended")
        return ev

    async def _download(self, upload: asyncio.Task | None) -> bool:
        """Upstream response -> client, streamed. Returns keep-alive."""
        cfg = self.ctx.cfg
        while True:
            try:
                ev = await self._read_up(cfg.response_timeout)
            except StreamTimeout:
                if upload is not None and not upload.done():
                    continue  # the body is still going up: the wait counts from its end
                raise
            if type(ev) is h11.InformationalResponse:
                if ev.status_code == 101 and self.upgrade:
                    await self._switch(ev)
                    return False
                if self.req.http_version != b"1.0" and ev.status_code != 101:
                    self._to_client(h11.InformationalResponse(
                        status_code=ev.status_code, headers=hdr.forwardable(
                            list(ev.headers.raw_items())), reason=ev.reason))
                continue
            break
        resp: h11.Response = ev
        rh = list(resp.headers.raw_items())
        if hdr.framing_conflict(rh):
            raise BadResponse(f"{self.up.address} sent both Content-Length and "
                              "Transfer-Encoding")
        self.status = resp.status_code
        self._to_client(h11.Response(status_code=resp.status_code,
                                     headers=hdr.forwardable(rh), reason=resp.reason,
                                     _parsed=True))
        self.phase = Phase.RESPONSE
        length = hdr.body_length(self.req.method, resp.status_code, rh)
        if length is not None:
            overran = await self._copy_body(length)
            keep_up = not overran and resp.http_version >= b"1.1" and not hdr.has_token(
                rh, b"connection", b"close")
        else:
            await self._h11_body(rh)
            keep_up = None
        self._finish(resp.reason, rh, keep_up)
        return True

    async def _copy_body(self, length: int) -> bool:
        """A body of known length, copied from the upstream socket to the client as read.

        h11 would copy every chunk three times (into its buffer, out of it, into the
        output); here the bytes go straight through. h11 still sees each chunk on the
        client side (no copy) so its state stays exact; the upstream side, whose state
        would only be discarded, gets a fresh h11 connection when the exchange ends.
        True when the origin sent more than announced (the connection is not reusable).
        """
        h, client, up, fl = self.h, self.client, self.up, self.fl
        idle = self.ctx.cfg.idle_timeout
        left = length
        overran = False
        data, _ = up.h.trailing_data  # type: ignore[union-attr]  # body read with the head
        while left:
            if not data:
                with TO_UPSTREAM:
                    data = await up.stream.read(idle)
                if not data:
                    raise UpstreamGone("connection closed before the response ended")
            if len(data) > left:  # more than announced: never reuse this connection
                data = data[:left]
                overran = True
            left -= len(data)
            if fl is not None:
                fl.response_data(data)
            with TO_CLIENT:
                for piece in h.send_with_data_passthrough(h11.Data(data=data)):  # type: ignore
                    client.write(piece)
                await client.drain()
            data = b""
        self._to_client(h11.EndOfMessage())
        return overran

    async def _h11_body(self, rh: list) -> None:
        """A chunked or close-delimited body, through h11 (trailers kept)."""
        idle, fl, client = self.ctx.cfg.idle_timeout, self.fl, self.client
        while True:
            ev = await self._read_up(idle)
            if type(ev) is h11.Data:
                if fl is not None:
                    fl.response_data(ev.data)
                self._to_client(ev)
                with TO_CLIENT:
                    await client.drain()
            elif type(ev) is h11.EndOfMessage:
                trailers = list(ev.headers.raw_items())
                break
        # Trailers need chunked framing towards the client (an HTTP/1.0 client gets a
        # close-delimited body); a failed h11.send would leave the connection in ERROR.
        if self.req.http_version == b"1.0" or not hdr.has_token(
                rh, b"transfer-encoding", b"chunked"):
            trailers = []
        self._to_client(h11.EndOfMessage(headers=trailers))

    def _finish(self, reason: bytes, rh: list, keep_up: bool | None) -> None:
        """Record the response; keep the upstream connection for the next request if it
        can carry one (keep_up None: as h11 says)."""
        self.phase = Phase.DONE
        if self.fl is not None:
            self.fl.respond(self.status, reason.decode("latin-1"), rh)
        up = self.up
        uh = up.h
        assert uh is not None
        if keep_up is None:
            if uh.our_state is h11.DONE and uh.their_state is h11.DONE:
                uh.start_next_cycle()
                return
        elif keep_up:
            up.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            return
        up.close()

    async def _switch(self, ev: h11.InformationalResponse) -> None:
        """101 Switching Protocols: answer the client, then relay bytes both ways."""
        up = self.up
        rh = list(ev.headers.raw_items())
        send(self.h, self.client, h11.InformationalResponse(
            status_code=101, headers=hdr.forwardable(rh, keep_upgrade=True), reason=ev.reason))
        self.status = 101
        self.phase = Phase.UPGRADED
        if self.fl is not None:
            self.fl.respond(101, ev.reason.decode("latin-1"), rh)
        self.client.unread(self.h.trailing_data[0])
        up.stream.unread(up.h.trailing_data[0])  # type: ignore[union-attr]
        relay = Relay(self.client, up.stream, self.ctx.cfg.idle_timeout)
        try:
            await relay.run()
        except Exception as e:  # reset or idle: the upgraded connection is over
            if not relay.teardown(e):  # else: recorded on the disconnect events (`how`)
                self.ctx.error("relay", f"upgraded connection ended: {e}", self.flow_id,
                               up.address)
        finally:
            up.close()


async def _settle(task: asyncio.Future | None) -> None:
    """Cancel a helper task and collect its outcome (no "exception never retrieved")."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
