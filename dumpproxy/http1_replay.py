"""Replay for HTTP/1 clients (SPEC §9.3): an intercepted request answered from the record.

`http1_server` calls `serve` before an exchange takes its upstream connection. The
request body is read whole (it is part of the match), then the recorded response is sent
(no DNS, no upstream connection), or a miss is refused (502 and an `error`, stage
`replay`), or, with `--replay-miss forward`, the body read is handed back to be forwarded.
"""

from __future__ import annotations

from dumpproxy import headers as hdr
from dumpproxy import http1_wire as wire
from dumpproxy.addresses import join_host_port
from dumpproxy.context import Context
from dumpproxy.flows import Flow
from dumpproxy.http1 import Exchange, refuse
from dumpproxy.http1_wire import Wire, protocol_error_text
from dumpproxy.replay import MAX_REQUEST_BODY, Recorded, Replay, Request
from dumpproxy.replaysource import BodyUnreadable, recorded_response
from dumpproxy.streams import Stream, StreamTimeout


class Forward:
    """A miss to forward: the request body's events, read already."""

    __slots__ = ("events",)

    def __init__(self, events: list):
        self.events = events


async def serve(ctx: Context, h: Wire, client: Stream, req: wire.Request,
                items: list[tuple[bytes, bytes]], replay: Replay, fl: Flow,
                rq: Request) -> bool | Forward:
    """Answer the request from the record: True/False as the pump's keep-alive, or
    Forward (a miss with --replay-miss forward)."""
    address = join_host_port(rq.host, rq.port)
    if hdr.has_token(items, b"expect", b"100-continue"):
        try:
            h.send(client, wire.InformationalResponse(status_code=100, headers=[],
                                                      reason=b"Continue"))
        except ConnectionError:
            fl.respond(0, "", [], "client")
            return False
    try:
        events = await _read_body(ctx, h, client)
    except wire.RemoteProtocolError as e:
        text = protocol_error_text(e, ctx.cfg.redact)
        return refuse(ctx, h, client, "http", 400, f"malformed request body: {text}", fl)
    except (ConnectionError, StreamTimeout):
        fl.respond(0, "", [], "client")
        return False
    if events is None:
        return refuse(ctx, h, client, "replay", 413, f"request body over "
                      f"{MAX_REQUEST_BODY} bytes: too large to match against the replay "
                      "files", fl, address)
    body = b"".join(ev.data for ev in events if type(ev) is wire.Data)
    rec = replay.match(rq, body)
    if rec is None:
        if replay.forward:
            return Forward(events)
        fl.request_data(body)
        return refuse(ctx, h, client, "replay", 502, replay.miss_message(rq), fl, address)
    fl.request_data(body)
    return await _answer(ctx, h, client, req, rec, fl, address)


async def _answer(ctx: Context, h: Wire, client: Stream, req: wire.Request, rec: Recorded,
                  fl: Flow, address: str) -> bool:
    try:
        out, data = await recorded_response(rec, req.method.decode("latin-1"))
    except BodyUnreadable as e:
        return refuse(ctx, h, client, "replay", 502, str(e), fl, address)
    reason = (rec.reason or hdr.reason_phrase(rec.status)).encode("latin-1", "replace")
    fl.replayed = rec.source
    try:
        h.send(client, wire.response(rec.status, hdr.fields(out), reason))
        if data:
            h.send_body(client, data)
        h.send(client, wire.EndOfMessage())
        await client.drain()
    except ConnectionError:
        fl.respond(rec.status, reason.decode("latin-1"), out, "client")
        return False
    fl.response_data(data)
    fl.respond(rec.status, reason.decode("latin-1"), out)
    return True


async def _read_body(ctx: Context, h: Wire, client: Stream) -> list | None:
    """The request body's events up to its end; None when it is over the cap."""
    events: list = []
    size = 0
    while True:
        ev = h.next_event()
        if ev is wire.NEED_DATA:
            data = await client.read(ctx.cfg.idle_timeout)
            if not data:
                raise ConnectionError("closed before the request body ended")
            h.receive(data)
        elif type(ev) is wire.Data:
            size += len(ev.data)
            if size > MAX_REQUEST_BODY:
                return None
            events.append(ev)
        elif type(ev) is wire.EndOfMessage:
            events.append(ev)
            return events


class ForwardedExchange(Exchange):
    """A miss forwarded to the destination: its request body comes from what was read
    for the match."""

    def __init__(self, *args, events: list):
        super().__init__(*args)
        self._events = events

    def _client_event(self):
        return self._events.pop(0)
