"""The HTTP/2 bridge: an h2 connection with the client, one with the origin, streams paired.

Each client stream is forwarded on its own upstream stream and recorded as its own flow.
Flow control is end to end: data received on one side is acknowledged (its window
reopened) only when it has been sent on the other side, so a slow reader throttles the
writer and each connection buffers at most its receive window.

A graceful GOAWAY (NO_ERROR) ends nothing at once. From the origin (nginx sends one after
`keepalive_requests`): its streams up to the last-stream-id finish on that connection,
streams above it (never processed) and new client streams go to a fresh upstream
connection, and the client's connection carries on. From the client: its open streams
finish, then the bridge ends.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from h2.connection import _decode_headers  # the HPACK step h2 itself uses
from h2.stream import StreamClosedBy

from dumpproxy import headers as hdr
from dumpproxy.context import Context
from dumpproxy.flows import Flow
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import Upstream, UpstreamError

# h2 formats repr(frame) for every frame it receives, even with logging off
# (H2Connection._receive_frame); for DATA that serializes and hex-encodes the whole
# payload. A summary keeps that cost independent of the payload size.
hyperframe.frame.DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"  # type: ignore

STREAM_WINDOW = 1024 * 1024  # per-stream receive window we grant
CONNECTION_WINDOW = 4 * 1024 * 1024  # and per connection: the most we ever buffer
MAX_STREAMS = 128
# Rapid Reset (CVE-2023-44487): streams a client may open and reset before getting their
# response, beyond one per response it did get (nginx and h2o account the same way). Past
# that the client gets GOAWAY ENHANCE_YOUR_CALM: the origin never sees more streams opened
# than about the concurrency limit, however fast the client resets.
RESET_ALLOWANCE = MAX_STREAMS
H2_ALPN = "h2"


class Pending:
    """Bytes waiting for window on the sending side, with what to acknowledge upstream."""

    __slots__ = ("chunks", "ended", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[list] = deque()  # [data, unacknowledged flow-controlled length]
        self.ended = False
        self.trailers: list | None = None


class _Connection(h2.connection.H2Connection):
    """h2 closes its state machine on any GOAWAY received, after which the frames of the
    streams the peer still finishes are protocol errors. A graceful GOAWAY (NO_ERROR)
    leaves the connection open here; the bridge opens no new stream on it."""

    def _receive_goaway_frame(self, frame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = h2.errors.ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class _ClientFacing(_Connection):
    """The client-facing connection: a stream over our MAX_CONCURRENT_STREAMS is refused
    on its own (RST_STREAM REFUSED_STREAM, RFC 9113 5.1.2). h2 makes it a connection error,
    and the requests that came in the same read within the limit would be lost with it."""

    def _receive_headers_frame(self, frame):  # type: ignore[override]
        sid = frame.stream_id
        if (sid not in self.streams and sid % 2 == 1 and sid > self.highest_inbound_stream_id
                and self.open_inbound_streams >= self.local_settings.max_concurrent_streams):
            _decode_headers(self.decoder, frame.data)  # HPACK state must stay in step
            self.highest_inbound_stream_id = sid
            self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM  # its DATA: reset too
            refuse = hyperframe.frame.RstStreamFrame(sid)
            refuse.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
            return [refuse], []
        return super()._receive_headers_frame(frame)


class Side:
    def __init__(self, name: str, stream: Stream, client_side: bool,
                 up: Upstream | None = None):
        self.name = name
        self.stream = stream
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                        validate_inbound_headers=True)
        self.conn = (_Connection if client_side else _ClientFacing)(config=cfg)
        self.pending: dict[int, Pending] = {}
        self.peer: Side  # a server side's peer is the client; the client has many servers
        self.closed = False
        self.up = up  # a server side's connection
        self.streams: dict[int, H2Stream] = {}  # a server side's pairs, by upstream id
        self.goaway: int | None = None  # last stream id of a graceful GOAWAY received

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.stream.write(data)
            except (ConnectionError, ssl.SSLError):
                self.closed = True  # the peer is gone (e.g. TLS saw EOF); its loop ends


class H2Stream:
    """A paired stream: client id and upstream id, and its flow."""

    __slots__ = ("client_id", "up_id", "flow", "status", "resp_headers", "done_up", "done_down",
                 "up_side", "request", "sent_body", "waiting")

    def __init__(self, client_id: int, up_id: int, flow: Flow | None,
                 up_side: Side | None = None):
        self.client_id = client_id
        self.up_id = up_id
        self.flow = flow
        self.status = 0
        self.resp_headers: list = []
        self.done_up = False
        self.done_down = False
        self.up_side = up_side  # the upstream connection; None while one is being opened
        self.request: list | None = None  # the headers sent upstream (to replay them)
        self.sent_body = False  # request data went upstream: the stream cannot be replayed
        self.waiting: Pending | None = None  # what the client sent while up_side was None


def _regular(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if not n.startswith(b":")]


def _pseudo(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {n: v for n, v in headers if n.startswith(b":")}


def _forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return hdr.forwardable(headers, http2=True)


def _check_frame_header(conn: h2.connection.H2Connection) -> None:
    """h2 checks a frame's length only once the whole frame is buffered, so garbage whose
    first bytes read as a huge length would wait for megabytes that never come. Refuse such
    a header at once (RFC 9113 4.2: FRAME_SIZE_ERROR)."""
    buf = conn.incoming_buffer
    data = getattr(buf, "_data", None)
    if data is None:
        data = getattr(buf, "data", b"")
    if len(data) >= 3:
        length = int.from_bytes(data[:3], "big")
        if length > conn.max_inbound_frame_size:
            conn.close_connection(error_code=h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
            raise h2.exceptions.FrameTooLargeError(
                f"frame of {length} bytes, more than the maximum "
                f"{conn.max_inbound_frame_size}")


class H2Bridge:
    def __init__(self, ctx: Context, client: Stream, up: Upstream, scheme: str, host: str,
                 authority: bytes | None = None):
        self.ctx = ctx
        self.up = up
        self.scheme = scheme
        self.host = host  # as the HTTP/1 bridge names it: the SNI, else the CONNECT host
        self.authority = authority  # reverse mode: every request's :authority
        self.client = Side("client", client, client_side=False)
        self.server = Side("server", up.stream, client_side=True, up=up)
        self.server.peer = self.client
        self.servers: list[Side] = [self.server]  # the first one, and any opened after
        self.current: Side | None = self.server  # where new streams go; None: being opened
        self.by_client: dict[int, H2Stream] = {}
        self._queued: list[H2Stream] = []  # streams waiting for a fresh upstream connection
        self._connecting: asyncio.Task | None = None
        self._tasks: set[asyncio.Future] = set()
        self._end: asyncio.Future | None = None
        self.answered = 0  # responses completed towards the client
        self.cancelled = 0  # streams the client reset before their response was complete

    # -- setup and loops --
    def _start(self, side: Side) -> None:
        side.conn.local_settings = h2.settings.Settings(
            client=side.conn.config.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        side.conn.initiate_connection()
        side.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        side.flush()

    def _spawn(self, coro) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._end is not None and not self._end.done():
            self._end.set_exception(exc)

    def _finish_bridge(self) -> None:
        if self._end is not None and not self._end.done():
            self._end.set_result(None)

    async def run(self) -> None:
        self._end = asyncio.get_running_loop().create_future()
        self._start(self.server)
        self._start(self.client)
        self._spawn(self._server_loop(self.server))
        client = self._spawn(self._client_loop())
        client.add_done_callback(lambda _: self._finish_bridge())
        try:
            await self._end
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._finish_forwarded(self.client)  # e.g. shutdown right after the last byte
            self._abandon_open_streams()
            for side in self.servers:
                if side.up is not None:
                    side.up.release()
            # h2's connection objects hold reference cycles; left to the cyclic GC they
            # pile up between its rare full passes. Collect them once per connection.
            for side in (self.client, *self.servers):
                side.pending.clear()
                side.streams.clear()
            for side in self.servers:
                del side.peer
            self.servers.clear()
            self._queued.clear()
            gc.collect()

    def _flush_all(self) -> None:
        self.client.flush()
        for s in self.servers:
            s.flush()

    async def _read(self, side: Side) -> bytes | None:
        """The side's next bytes; None when its loop is over (its end already handled)."""
        idle = self.ctx.cfg.idle_timeout
        try:
            return await side.stream.read(idle)
        except StreamTimeout:
            self._goaway_both(f"no data from the {side.name} for {idle:g} s")
            self._finish_bridge()
            return None

    def _receive(self, side: Side, data: bytes) -> bool:
        """Feed the side's bytes to h2 and handle its events; False: this side is over."""
        try:
            events = side.conn.receive_data(data)
            _check_frame_header(side.conn)
        except h2.exceptions.ProtocolError as e:
            self.ctx.error("http2", f"protocol error from the {side.name}: {e}",
                           address=self.up.address)
            side.flush()  # h2 queued a GOAWAY for the offender
            self._close_all_but(side)
            self._finish_bridge()
            return False
        for ev in events:
            if self._handle(side, ev) is False:
                self._flush_all()
                return False
        self._flush_all()
        return True

    async def _client_loop(self) -> None:
        side = self.client
        while True:
            try:
                data = await self._read(side)
            except ConnectionError as e:
                self._finish_forwarded(side)
                if self.by_client:  # a reset with nothing in flight is just a close
                    self.ctx.error("http2", f"client connection lost: {e}",
                                   address=self.up.address)
                return
            if data is None:
                return
            if not data:
                self._finish_forwarded(side)
                if self.by_client:
                    self.ctx.error("http2", f"client closed the connection with "
                                   f"{len(self.by_client)} stream(s) open",
                                   address=self.up.address)
                self._close_all_but(side)
                return
            if side.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
                return  # the bridge already closed this side (GOAWAY sent): it is ending
            if not self._receive(side, data):
                return
            if side.goaway is not None and not self.by_client:
                self._close_side(side)  # the client said goodbye and all is answered
                return
            try:
                for s in self.servers:
                    await s.stream.drain()
                await side.stream.drain()
            except ConnectionError as e:
                if self.by_client:
                    self.ctx.error("http2", f"connection lost while writing: {e}",
                                   address=self.up.address)
                return

    async def _server_loop(self, side: Side) -> None:
        while True:
            try:
                data = await self._read(side)
            except ConnectionError as e:
                if side.streams:
                    self.ctx.error("http2", f"server connection lost: {e}",
                                   address=self.up.address)
                    self._close_all_but(side)
                    self._finish_bridge()
                else:
                    self._retire(side)
                return
            if data is None:
                return
            if not data:
                if side.streams:
                    self.ctx.error("http2", f"server closed the connection with "
                                   f"{len(side.streams)} stream(s) open",
                                   address=self.up.address)
                    self._close_all_but(side)
                    self._finish_bridge()
                else:  # an idle upstream closed (or one that sent GOAWAY): open anew later
                    self._retire(side)
                return
            if side.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
                return
            if not self._receive(side, data):
                return
            if self.client.goaway is not None and not self.by_client:
                self._close_side(self.client)
                self._finish_bridge()
                return
            if side.goaway is not None and not side.streams:
                self._close_side(side)  # drained after its GOAWAY
                self._retire(side)
                return
            try:
                await self.client.stream.drain()
                await side.stream.drain()
            except ConnectionError as e:
                if self.by_client:
                    self.ctx.error("http2", f"connection lost while writing: {e}",
                                   address=self.up.address)
                self._finish_bridge()
                return

    def _close_side(self, side: Side) -> None:
        """Our own graceful GOAWAY on this side."""
        if side.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            try:
                side.conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            side.flush()

    def _close_all_but(self, side: Side) -> None:
        for s in (self.client, *self.servers):
            if s is not side:
                self._close_side(s)

    def _retire(self, side: Side) -> None:
        """A server connection is done: new streams go to a fresh one."""
        if self.current is side:
            self.current = None
        if side.up is not None:
            side.up.release()
        if side in self.servers:
            self.servers.remove(side)
            side.pending.clear()

    def _calm_down(self) -> None:
        """Too many streams opened and reset: end the client's connection (and so the
        upstream ones, with whatever they still had open)."""
        self.ctx.error("http2", f"the client reset {self.cancelled} streams before their "
                       "responses (HTTP/2 rapid reset): connection closed with "
                       "ENHANCE_YOUR_CALM", address=self.up.address)
        self.client.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._close_all_but(self.client)

    def _goaway_both(self, message: str) -> None:
        self.ctx.error("http2", message, address=self.up.address)
        for s in (self.client, *self.servers):
            s.conn.close_connection()
            s.flush()

    # -- a fresh upstream connection --
    def _upstream_for_new_stream(self) -> Side | None:
        side = self.current
        if side is not None and side.goaway is None and not side.closed:
            return side
        self.current = None
        if self._connecting is None:
            self._connecting = self._spawn(self._connect())
        return None

    async def _connect(self) -> None:
        try:
            try:
                up = await self.ctx.open_upstream(self.up.host, self.up.port,
                                                  (self.host, (H2_ALPN,)))
            except UpstreamError as e:
                self.ctx.error(e.stage, e.message, address=self.up.address)  # type: ignore
                self._refuse_queued()
                return
            if up.tls is None or up.tls.ssl.selected_alpn_protocol() != H2_ALPN:
                self.ctx.error("upstream", f"{up.address} no longer speaks HTTP/2",
                               address=self.up.address)
                up.release()
                self._refuse_queued()
                return
            side = Side("server", up.stream, client_side=True, up=up)
            side.peer = self.client
            self.servers.append(side)
            self._start(side)
            self.current = side
            self._spawn(self._server_loop(side))
            queued, self._queued = self._queued, []
            for pair in queued:
                if self.by_client.get(pair.client_id) is pair:
                    self._attach(pair, side)
            self._flush_all()
        finally:
            self._connecting = None

    def _refuse_queued(self) -> None:
        queued, self._queued = self._queued, []
        for pair in queued:
            self._refuse(pair)
        self.client.flush()

    def _refuse(self, pair: H2Stream) -> None:
        """The client's stream was not processed upstream: REFUSED_STREAM (a client may
        retry it)."""
        self.by_client.pop(pair.client_id, None)
        pair.flow = None
        try:
            self.client.conn.reset_stream(pair.client_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _attach(self, pair: H2Stream, side: Side) -> None:
        """Send a stream's request headers (and whatever waited) on this connection."""
        conn = side.conn
        waiting = pair.waiting
        ended = pair.done_up and (waiting is None or not waiting.chunks)
        try:
            up_id = conn.get_next_available_stream_id()
            conn.send_headers(up_id, pair.request, end_stream=ended)
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError) as e:
            self.ctx.error("http2", f"cannot open an upstream stream: {e}",
                           flow=pair.flow.flow if pair.flow else None, address=self.up.address)
            self._refuse(pair)
            return
        pair.up_id = up_id
        pair.up_side = side
        side.streams[up_id] = pair
        pair.waiting = None
        if ended:
            pair.done_up = True
        elif waiting is not None and (waiting.chunks or waiting.ended or waiting.trailers):
            side.pending[up_id] = waiting
            self._pump(side, up_id)

    def _goaway(self, side: Side, last_stream_id: int) -> None:
        """A graceful GOAWAY from this side."""
        side.goaway = last_stream_id
        side.stream.mark("peer_closed")  # how the connection ends, said by the peer
        if side is self.client:
            return  # its open streams finish; the client loop ends the bridge after them
        if self.current is side:
            self.current = None
        # Streams above last_stream_id were not processed: replay them on a fresh
        # connection when nothing of their body went out, else refuse them.
        for up_id, pair in sorted(side.streams.items()):
            if up_id <= last_stream_id:
                continue
            del side.streams[up_id]
            q = side.pending.pop(up_id, None)
            if pair.sent_body or pair.request is None:
                self._refuse(pair)
                continue
            pair.up_side = None
            pair.waiting = q
            self._queued.append(pair)
            self._upstream_for_new_stream()

    # -- events --
    def _handle(self, side: Side, ev) -> bool | None:
        t = type(ev)
        if t is h2.events.DataReceived:
            self._data(side, ev)
        elif t is h2.events.RequestReceived:
            self._request(ev)
        elif t is h2.events.ResponseReceived:
            self._response(side, ev)
        elif t is h2.events.InformationalResponseReceived:
            pair = side.streams.get(ev.stream_id)
            if pair is not None:
                self._send_headers(self.client, pair.client_id, _forwardable(ev.headers))
        elif t is h2.events.TrailersReceived:
            self._trailers(side, ev)
        elif t is h2.events.StreamEnded:
            self._ended(side, ev.stream_id)
        elif t is h2.events.WindowUpdated:
            if ev.stream_id == 0:
                for sid in list(side.pending):
                    self._pump(side, sid)
            else:
                self._pump(side, ev.stream_id)
        elif t is h2.events.RemoteSettingsChanged:
            for sid in list(side.pending):
                self._pump(side, sid)
        elif t is h2.events.StreamReset:
            if self._reset(side, ev) and side is self.client:
                self.cancelled += 1
                if self.cancelled > RESET_ALLOWANCE + self.answered:
                    self._calm_down()
                    return False
        elif t is h2.events.ConnectionTerminated:
            if ev.error_code == h2.errors.ErrorCodes.NO_ERROR:
                self._goaway(side, ev.last_stream_id)
                return None
            self.ctx.error("http2", f"{side.name} sent GOAWAY ({ev.error_code!s}, "
                           f"last stream {ev.last_stream_id})", address=self.up.address)
            self._close_all_but(side)
            self._finish_bridge()
            return False
        return None

    def _pairs(self, side: Side) -> dict[int, H2Stream]:
        return self.by_client if side is self.client else side.streams

    def _request(self, ev: h2.events.RequestReceived) -> None:
        headers = list(ev.headers)
        pseudo = _pseudo(headers)
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = pseudo.get(b":path", b"/").decode("latin-1")
        self.ctx.services.stats.requests += 1
        flow = Flow(self.ctx, method, self.scheme, self.host, self.up.port, path,
                    "HTTP/2.0", _regular(headers))
        out = [(n, v) for n, v in headers if n.startswith(b":")] + _forwardable(
            _regular(headers))
        if self.authority is not None:  # reverse mode: the target's, whatever the client said
            out = [(n, self.authority if n == b":authority" else v) for n, v in out
                   if n != b"host"]
        pair = H2Stream(ev.stream_id, 0, flow)
        pair.request = out
        pair.done_up = ev.stream_ended is not None
        self.by_client[ev.stream_id] = pair
        side = self._upstream_for_new_stream()
        if side is None:  # a fresh upstream connection is being opened
            self._queued.append(pair)
        else:
            self._attach(pair, side)

    def _response(self, side: Side, ev: h2.events.ResponseReceived) -> None:
        pair = side.streams.get(ev.stream_id)
        if pair is None:
            return
        pair.request = None  # answered: never replayed
        headers = list(ev.headers)
        status = _pseudo(headers).get(b":status", b"0")
        pair.status = int(status) if status.isdigit() else 0
        pair.resp_headers = _regular(headers)
        out = [(b":status", status)] + _forwardable(pair.resp_headers)
        ended = ev.stream_ended is not None
        self._send_headers(self.client, pair.client_id, out, end_stream=ended)
        if ended:
            pair.done_down = True
            self._finish(pair)

    def _send_headers(self, side: Side, sid: int, headers: list, end_stream: bool = False):
        try:
            side.conn.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            pass

    def _waiting(self, pair: H2Stream) -> Pending:
        if pair.waiting is None:
            pair.waiting = Pending()
        return pair.waiting

    def _data(self, side: Side, ev: h2.events.DataReceived) -> None:
        pair = self._pairs(side).get(ev.stream_id)
        if pair is None:
            side.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return
        if pair.flow is not None:
            if side is self.client:
                pair.flow.request_data(ev.data)
            else:
                pair.flow.response_data(ev.data)
        if side is self.client and pair.up_side is None:  # its upstream is being opened
            self._waiting(pair).chunks.append([ev.data, ev.flow_controlled_length])
            return
        target = pair.up_side if side is self.client else self.client
        tid = pair.up_id if side is self.client else pair.client_id
        q = target.pending.get(tid)  # type: ignore[union-attr]
        if q is None:
            q = target.pending[tid] = Pending()  # type: ignore[union-attr]
        q.chunks.append([ev.data, ev.flow_controlled_length])
        self._pump(target, tid)  # type: ignore[arg-type]

    def _trailers(self, side: Side, ev: h2.events.TrailersReceived) -> None:
        pair = self._pairs(side).get(ev.stream_id)
        if pair is None:
            return
        if side is self.client and pair.up_side is None:
            self._waiting(pair).trailers = _forwardable(list(ev.headers))
            return
        target = pair.up_side if side is self.client else self.client
        tid = pair.up_id if side is self.client else pair.client_id
        q = target.pending.setdefault(tid, Pending())  # type: ignore[union-attr]
        q.trailers = _forwardable(list(ev.headers))

    def _ended(self, side: Side, sid: int) -> None:
        pair = self._pairs(side).get(sid)
        if pair is None:
            return
        if side is self.client and pair.up_side is None:
            self._waiting(pair).ended = True
            return
        if side is self.client and pair.done_up and pair.up_id not in pair.up_side.pending:
            return  # ended with its headers: already sent with END_STREAM
        if side is not self.client and pair.done_down:
            return
        target = pair.up_side if side is self.client else self.client
        tid = pair.up_id if side is self.client else pair.client_id
        q = target.pending.setdefault(tid, Pending())  # type: ignore[union-attr]
        q.ended = True
        self._pump(target, tid)  # type: ignore[arg-type]

    def _source(self, target: Side, tid: int) -> tuple[H2Stream | None, Side | None]:
        """The pair of target's stream tid, and the side its data comes from."""
        if target is self.client:
            pair = self.by_client.get(tid)
            return pair, (pair.up_side if pair is not None else None)
        return target.streams.get(tid), self.client

    def _pump(self, target: Side, tid: int) -> None:
        """Send what the window allows; acknowledge it to the source; finish the stream."""
        q = target.pending.get(tid)
        if q is None:
            return
        pair, source = self._source(target, tid)
        to_server = target is not self.client
        sid = None if pair is None else (pair.client_id if to_server else pair.up_id)
        conn = target.conn
        try:
            while q.chunks:
                window = conn.local_flow_control_window(tid)
                if window <= 0:
                    return
                item = q.chunks[0]
                data = item[0]
                n = min(len(data), window, conn.max_outbound_frame_size)
                if n < len(data):
                    conn.send_data(tid, data[:n])
                    item[0] = data[n:]
                    ack = n
                else:
                    conn.send_data(tid, data)
                    q.chunks.popleft()
                    ack = item[1]  # includes padding
                item[1] -= ack
                if to_server and pair is not None:
                    pair.sent_body = True
                if sid is not None and ack and source is not None:
                    try:
                        source.conn.acknowledge_received_data(ack, sid)
                    except h2.exceptions.StreamClosedError:
                        pass
            if q.ended:
                if q.trailers is not None:
                    conn.send_headers(tid, q.trailers, end_stream=True)
                else:
                    conn.end_stream(tid)
                del target.pending[tid]
                if pair is not None:
                    if to_server:
                        pair.done_up = True
                    else:
                        pair.done_down = True
                        self._finish(pair)
        except h2.exceptions.StreamClosedError:
            self._drop(target, tid, sid)
        except h2.exceptions.FlowControlError:
            return

    def _drop(self, target: Side, tid: int, source_sid: int | None) -> None:
        """Discard what waits for target's stream tid, giving its window back to the
        sender: unacknowledged bytes would shrink the source connection's window for good."""
        q = target.pending.pop(tid, None)
        if q is None:
            return
        unacked = sum(item[1] for item in q.chunks)
        _, source = self._source(target, tid)
        if unacked and source_sid is not None and source is not None:
            try:
                source.conn.acknowledge_received_data(unacked, source_sid)
            except h2.exceptions.ProtocolError:
                pass

    def _finish(self, pair: H2Stream) -> None:
        """The response is complete towards the client: record it, forget the pair."""
        if pair.flow is not None:
            pair.flow.respond(pair.status, hdr.reason_phrase(pair.status), pair.resp_headers)
            self.answered += 1
            pair.flow = None
        if pair.up_side is not None:
            self._drop(pair.up_side, pair.up_id, pair.client_id)  # upload not read
            pair.up_side.streams.pop(pair.up_id, None)
        self.by_client.pop(pair.client_id, None)

    def _finish_forwarded(self, side: Side) -> None:
        """The client went away: record the exchanges it received whole (curl, for one,
        closes once content-length is met, before the origin's END_STREAM arrives)."""
        if side is self.client:
            for pair in list(self.by_client.values()):
                if self._forwarded_whole(pair):
                    self._finish(pair)

    def _forwarded_whole(self, pair: H2Stream) -> bool:
        """The whole response body (per content-length) reached the client; only the
        upstream's END_STREAM is missing."""
        if not pair.status or pair.flow is None:
            return False
        q = self.client.pending.get(pair.client_id)
        if q is not None and q.chunks:
            return False
        length = hdr.body_length(pair.flow.method, pair.status, pair.resp_headers)
        return length is not None and length == pair.flow.response_bytes

    def _reset(self, side: Side, ev: h2.events.StreamReset) -> bool:
        """Pass a reset on to the paired stream; True when it cut an exchange short."""
        pair = self._pairs(side).get(ev.stream_id)
        if pair is None:
            return False
        code = ev.error_code
        other, oid = (pair.up_side, pair.up_id) if side is self.client else (
            self.client, pair.client_id)
        if other is not None:
            try:
                other.conn.reset_stream(oid, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._drop(other, oid, ev.stream_id)
        if side is self.client and self._forwarded_whole(pair):
            # The client had the whole response (curl resets once Content-Length is met,
            # before the origin's END_STREAM): a completed exchange, not a failure.
            self._finish(pair)
            return False
        self._drop(side, ev.stream_id, oid)
        flow = pair.flow
        pair.flow = None
        self.by_client.pop(pair.client_id, None)
        if pair.up_side is not None:
            pair.up_side.streams.pop(pair.up_id, None)
        name = getattr(code, "name", str(code))
        self.ctx.error("http2", f"{side.name} reset the stream ({name})",
                       flow=flow.flow if flow else None, address=self.up.address)
        return True

    def _abandon_open_streams(self) -> None:
        for pair in list(self.by_client.values()):
            if pair.flow is not None:
                self.ctx.error("http2", "connection closed before the response ended",
                               flow=pair.flow.flow, address=self.up.address)
                pair.flow = None
        self.by_client.clear()
