"""The HTTP/1 pump: one exchange forwarded between a client and an upstream connection.

The caller (`http1_server`) has already parsed the target, checked authentication,
decided, and opened the upstream; the pump sends the request, streams the bodies both
ways (nothing is held whole), relays an upgraded connection after 101, and maps every
failure, in one place, to the side it came from and to what the client is told.
"""

from __future__ import annotations

import asyncio
import enum

from dumpproxy import headers as hdr
from dumpproxy import http1_wire as wire
from dumpproxy.context import Context
from dumpproxy.flows import Flow
from dumpproxy.http1_wire import Wire, answer_error, error_response, protocol_error_text
from dumpproxy.relay import Relay
from dumpproxy.schema import Aborted, Stage
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import Upstream

# --- failures, named for the side they came from ------------------------------------------


class PeerGone(Exception):
    """One side closed, reset or broke its connection mid-exchange."""


class ClientGone(PeerGone):
    pass


class UpstreamGone(PeerGone):
    pass


class BadResponse(Exception):
    pass


class BadRequestBody(Exception):
    """The client's request body broke HTTP/1's framing."""


def _gone(side: type[PeerGone], e: ConnectionError) -> PeerGone:
    """A transport failure as the exception naming the side it came from (raised `from
    None`; a try block costs nothing until it fails, unlike a context manager's calls)."""
    return side(str(e) or "connection reset")


class Phase(enum.Enum):
    """Where an exchange is; what a failure means for the client depends on it."""

    REQUEST = "waiting for the response head"  # the client can still get an error answer
    RESPONSE = "streaming the response"  # the head went out: a failure cuts the client
    UPGRADED = "relaying the upgraded connection"
    DONE = "done"


# --- answers of dumpproxy's own --------------------------------------------------------


def answer(ctx: Context, h: Wire, client: Stream, fl: Flow | None, status: int,
           message: str, extra: tuple = (), server: int | None = None) -> None:
    """dumpproxy answers the request itself (the connection closes after it); a recorded
    exchange gets it as its `response` (or as cut by the client, when it is gone)."""
    events = error_response(status, message, extra)
    sent = answer_error(h, client, status, message, extra)
    if fl is None:
        return
    if not sent:
        fl.respond(0, "", [], "client", server)
        return
    head, data = events[0], events[1]
    fl.response_data(data.data)
    fl.respond(status, head.reason.decode("latin-1"), list(head.headers.raw_items()),
               server=server)


def refuse(ctx: Context, h: Wire, client: Stream, stage: Stage, status: int, message: str,
           fl: Flow | None = None, address: str | None = None, extra: tuple = (),
           server: int | None = None) -> bool:
    """An `error` (with the exchange's flow) and dumpproxy's answer; the connection ends.
    server: the upstream connection the exchange had reached, if any."""
    ctx.error(stage, message, fl.flow if fl is not None else None, address)
    answer(ctx, h, client, fl, status, message, extra, server)
    return False


# --- the pump -----------------------------------------------------------------------------


class Exchange:
    """One request/response through the bridge."""

    def __init__(self, ctx: Context, h: Wire, client: Stream, req: wire.Request,
                 up: Upstream, path: bytes, headers: list[hdr.Field],
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
        self.head: tuple[bytes, list] | None = None  # the response's reason and headers

    @property
    def flow_id(self) -> int | None:
        return self.fl.flow if self.fl is not None else None

    async def run(self) -> bool:
        """Forward the exchange; True when the client connection may be kept alive."""
        up = self.up
        if up.wire is None:
            up.wire = Wire("client")
        upload: asyncio.Task | None = None
        # A client that goes away while the origin keeps us waiting is cut at once.
        client_sock = self.ctx.stream
        client_sock.on_lost = self._client_lost
        try:
            try:  # (nothing here touches the client's connection)
                up.wire.send(up.stream, wire.request(self.req.method, self.path, self.headers))
                first = self._client_event()
                if type(first) is wire.EndOfMessage:
                    up.wire.send(up.stream, first)
                    await up.stream.drain()
            except ConnectionError as e:
                raise _gone(UpstreamGone, e) from None
            if type(first) is wire.EndOfMessage:
                return await self._download(None)
            upload = self.ctx.loop.create_task(self._upload(first))
            return await self._with_upload(upload)
        except asyncio.CancelledError:
            await _settle(upload)
            up.sock.mark("shutdown")
            up.release()
            self._cut("shutdown")
            raise
        except Exception as e:
            await _settle(upload)
            return self._broken(e)
        finally:
            client_sock.on_lost = None

    def _client_lost(self) -> None:
        self.up.sock.interrupt(ClientGone("the client connection was lost"))

    async def _with_upload(self, upload: asyncio.Task) -> bool:
        """The response is read while the request body still goes up; whichever side
        fails first ends the exchange at once."""
        down = self.ctx.loop.create_task(self._download(upload))
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
            self.up.release()  # its request was cut short: never reuse it
            return False
        if upload.exception() is not None:
            raise upload.exception()  # type: ignore[misc]
        return keep

    def _cut(self, by: Aborted) -> None:
        """Record the exchange as cut short (unless its response is written already)."""
        if self.phase in (Phase.DONE, Phase.UPGRADED):
            return
        self.phase = Phase.DONE
        if self.fl is not None:
            reason, rh = self.head or (b"", [])
            self.fl.respond(self.status, reason.decode("latin-1"), rh, by, self.up.id)

    def _broken(self, e: BaseException) -> bool:
        """Something failed mid-exchange: record it, answer if we still can, close."""
        up, ctx = self.up, self.ctx
        up.release()
        if isinstance(e, ClientGone):  # the client's own doing: orderly, no error
            self._cut("client")
            return False
        if isinstance(e, BadRequestBody):
            if self.phase is Phase.REQUEST:
                return refuse(ctx, self.h, self.client, "http", 400, str(e), self.fl,
                              server=up.id)
            ctx.error("http", str(e), self.flow_id)
            self.client.abort()
            self._cut("client")
            return False
        if isinstance(e, StreamTimeout):
            status = 504
            msg = (f"no response from {up.address} within {ctx.cfg.response_timeout:g} s"
                   if self.phase is Phase.REQUEST else f"{up.address} stalled mid-response")
        elif isinstance(e, wire.RemoteProtocolError):
            text = protocol_error_text(e, ctx.cfg.redact)  # the raw line may hold a cookie
            status, msg = 502, f"malformed response from {up.address}: {text}"
        elif isinstance(e, BadResponse):
            status, msg = 502, str(e)
        elif isinstance(e, UpstreamGone):
            status, msg = 502, f"{up.address} closed the connection: {e}"
        else:
            status, msg = 502, f"error talking to {up.address}: {e!r}"
        if self.phase is Phase.REQUEST:
            return refuse(ctx, self.h, self.client, "upstream", status, msg, self.fl,
                          up.address, server=up.id)
        ctx.error("upstream", msg, self.flow_id, up.address)
        self.client.abort()
        self._cut("server")
        return False

    # -- request side --
    def _client_event(self):
        try:
            return self.h.next_event()
        except wire.RemoteProtocolError as e:
            text = protocol_error_text(e, self.ctx.cfg.redact)
            raise BadRequestBody(f"malformed request body: {text}") from None

    async def _upload(self, ev) -> None:
        """Client body -> upstream, streamed. (The client's own failures are named where it
        is read; any other transport failure here is the upstream's.)"""
        up, idle = self.up, self.ctx.cfg.idle_timeout
        try:
            while True:
                if ev is wire.NEED_DATA:
                    try:
                        data = await self.client.read(idle)
                    except (StreamTimeout, ConnectionError) as e:
                        raise ClientGone(f"request body interrupted: {e!r}") from None
                    if not data:  # the parser would call this malformed; it is a departure
                        raise ClientGone("closed before the request body ended")
                    self.h.receive(data)
                elif type(ev) is wire.Data:
                    if self.fl is not None:
                        self.fl.request_data(ev.data)
                    up.wire.send(up.stream, ev)  # type: ignore[union-attr]
                    await up.stream.drain()
                elif type(ev) is wire.EndOfMessage:
                    up.wire.send(up.stream, ev)  # type: ignore[union-attr]
                    return
                ev = self._client_event()
        except ConnectionError as e:
            raise _gone(UpstreamGone, e) from None

    # -- response side --
    def _to_client(self, event) -> None:
        try:
            self.h.send(self.client, event)
        except ConnectionError as e:
            raise _gone(ClientGone, e) from None

    async def _read_up(self, timeout: float):
        try:
            ev = await self.up.wire.read_event(self.up.stream, timeout)  # type: ignore
        except ConnectionError as e:
            raise _gone(UpstreamGone, e) from None
        if type(ev) is wire.ConnectionClosed:
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
            if type(ev) is wire.InformationalResponse:
                if ev.status_code == 101 and self.upgrade:
                    await self._switch(ev)
                    return False
                if self.req.http_version != b"1.0" and ev.status_code != 101:
                    self._to_client(wire.InformationalResponse(
                        status_code=ev.status_code, headers=hdr.forwardable(
                            list(ev.headers.raw_items())), reason=ev.reason))
                continue
            break
        resp: wire.Response = ev
        rh = resp.headers.raw_items()  # (a new list)
        head = wire.fields(resp)
        facts = hdr.Facts(head)
        if facts.framing_conflict:
            raise BadResponse(f"{self.up.address} sent both Content-Length and "
                              "Transfer-Encoding")
        self.status = resp.status_code
        self.head = (resp.reason, rh)
        self._to_client(wire.response(
            resp.status_code, hdr.forwardable_fields(head, tokens=facts.connection),
            resp.reason))
        self.phase = Phase.RESPONSE
        length = hdr.body_length(self.req.method, resp.status_code, rh, facts)
        if length is not None:
            overran = await self._copy_body(length)
            keep_up = not overran and resp.http_version >= b"1.1" and \
                b"close" not in facts.connection
        else:
            await self._parsed_body(rh)
            keep_up = None
        self._finish(resp.reason, rh, keep_up)
        return True

    async def _copy_body(self, length: int) -> bool:
        """A body of known length, copied from the upstream socket to the client as read.

        The parser would copy every chunk three times (into its buffer, out of it, into
        the output); here the bytes go straight through. The client side's wire still
        frames each chunk (no copy) so its state stays exact; the upstream side, whose
        state would only be discarded, gets a fresh wire when the exchange ends.
        True when the origin sent more than announced (the connection is not reusable).
        """
        h, client, up, fl = self.h, self.client, self.up, self.fl
        idle = self.ctx.cfg.idle_timeout
        left = length
        overran = False
        data = up.wire.trailing  # type: ignore[union-attr]  # body read with the head
        while left:
            if not data:
                try:
                    data = await up.stream.read(idle)
                except ConnectionError as e:
                    raise _gone(UpstreamGone, e) from None
                if not data:
                    raise UpstreamGone("connection closed before the response ended")
            if len(data) > left:  # more than announced: never reuse this connection
                data = data[:left]
                overran = True
            left -= len(data)
            if fl is not None:
                fl.response_data(data)
            try:
                h.send_body(client, data)
                await client.drain()
            except ConnectionError as e:
                raise _gone(ClientGone, e) from None
            data = b""
        self._to_client(wire.EndOfMessage())
        return overran

    async def _parsed_body(self, rh: list) -> None:
        """A chunked or close-delimited body, through the parser (trailers kept)."""
        idle, fl, client = self.ctx.cfg.idle_timeout, self.fl, self.client
        while True:
            ev = await self._read_up(idle)
            if type(ev) is wire.Data:
                if fl is not None:
                    fl.response_data(ev.data)
                self._to_client(ev)
                try:
                    await client.drain()
                except ConnectionError as e:
                    raise _gone(ClientGone, e) from None
            elif type(ev) is wire.EndOfMessage:
                trailers = list(ev.headers.raw_items())
                break
        # Trailers need chunked framing towards the client (an HTTP/1.0 client gets a
        # close-delimited body); a failed send would leave the connection in ERROR.
        if self.req.http_version == b"1.0" or not hdr.has_token(
                rh, b"transfer-encoding", b"chunked"):
            trailers = []
        self._to_client(wire.EndOfMessage(headers=trailers))

    def _finish(self, reason: bytes, rh: list, keep_up: bool | None) -> None:
        """Record the response; keep the upstream connection for the next request if it
        can carry one (keep_up None: as the wire says)."""
        self.phase = Phase.DONE
        if self.fl is not None:
            self.fl.respond(self.status, reason.decode("latin-1"), rh, server=self.up.id)
        up = self.up
        assert up.wire is not None
        if keep_up is None:
            if up.wire.next_cycle():
                return
        elif keep_up:
            up.wire = Wire("client")
            return
        up.release()

    async def _switch(self, ev: wire.InformationalResponse) -> None:
        """101 Switching Protocols: answer the client, then relay bytes both ways."""
        up = self.up
        rh = list(ev.headers.raw_items())
        self.h.send(self.client, wire.InformationalResponse(
            status_code=101, headers=hdr.forwardable(rh, keep_upgrade=True), reason=ev.reason))
        self.status = 101
        self.phase = Phase.UPGRADED
        if self.fl is not None:
            self.fl.respond(101, ev.reason.decode("latin-1"), rh, server=up.id)
        self.client.unread(self.h.trailing)
        up.stream.unread(up.wire.trailing)  # type: ignore[union-attr]
        self.ctx.stream.on_lost = None  # the relay ends the upgraded connection itself
        relay = Relay(self.client, up.stream, self.ctx.cfg.idle_timeout)
        try:
            await relay.run()
        except Exception as e:  # reset or idle: the upgraded connection is over
            if not relay.teardown(e):  # else: recorded on the disconnect events (`how`)
                self.ctx.error("relay", f"upgraded connection ended: {e}", self.flow_id,
                               up.address)
        finally:
            up.release()


async def _settle(task: asyncio.Future | None) -> None:
    """Cancel a helper task and collect its outcome (no "exception never retrieved")."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
