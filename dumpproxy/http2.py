"""The HTTP/2 bridge: an h2 connection with the client, one with the origin, streams paired.

Each client stream is forwarded on its own upstream stream and recorded as its own flow.
Flow control is end to end: data received on one side is acknowledged (its window
reopened) only when it has been sent on the other side, so a slow reader throttles the
writer and each connection buffers at most its receive window.
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
from dumpproxy.upstream import Upstream

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


class Pending:
    """Bytes waiting for window on the sending side, with what to acknowledge upstream."""

    __slots__ = ("chunks", "ended", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[list] = deque()  # [data, unacknowledged flow-controlled length]
        self.ended = False
        self.trailers: list | None = None


class RefusingH2Connection(h2.connection.H2Connection):
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
    def __init__(self, name: str, stream: Stream, client_side: bool):
        self.name = name
        self.stream = stream
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                        validate_inbound_headers=True)
        conn_class = h2.connection.H2Connection if client_side else RefusingH2Connection
        self.conn = conn_class(config=cfg)
        self.pending: dict[int, Pending] = {}
        self.peer: Side
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.stream.write(data)
            except (ConnectionError, ssl.SSLError):
                self.closed = True  # the peer is gone (e.g. TLS saw EOF); its loop ends


class H2Stream:
    """A paired stream: client id and upstream id, and its flow."""

    __slots__ = ("client_id", "up_id", "flow", "status", "resp_headers", "done_up", "done_down")

    def __init__(self, client_id: int, up_id: int, flow: Flow | None):
        self.client_id = client_id
        self.up_id = up_id
        self.flow = flow
        self.status = 0
        self.resp_headers: list = []
        self.done_up = False
        self.done_down = False


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
    def __init__(self, ctx: Context, client: Stream, up: Upstream, scheme: str, host: str):
        self.ctx = ctx
        self.up = up
        self.scheme = scheme
        self.host = host  # as the HTTP/1 bridge names it: the SNI, else the CONNECT host
        self.authority: bytes | None = None  # reverse mode: every request's :authority
        self.client = Side("client", client, client_side=False)
        self.server = Side("server", up.stream, client_side=True)
        self.client.peer, self.server.peer = self.server, self.client
        self.by_client: dict[int, H2Stream] = {}
        self.by_up: dict[int, H2Stream] = {}
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

    async def run(self) -> None:
        self._start(self.server)
        self._start(self.client)
        loops = [asyncio.ensure_future(self._loop(self.client)),
                 asyncio.ensure_future(self._loop(self.server))]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
        finally:
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            self._finish_forwarded(self.client)  # e.g. shutdown right after the last byte
            self._abandon_open_streams()
            # h2's connection objects hold reference cycles; left to the cyclic GC they
            # pile up between its rare full passes. Collect them once per connection.
            for side in (self.client, self.server):
                side.pending.clear()
                del side.peer
            gc.collect()

    async def _loop(self, side: Side) -> None:
        idle = self.ctx.cfg.idle_timeout
        while True:
            try:
                data = await side.stream.read(idle)
            except StreamTimeout:
                self._goaway_both(f"no data from the {side.name} for {idle:g} s")
                return
            except ConnectionError as e:
                self._finish_forwarded(side)
                if self.by_client:  # a reset with nothing in flight is just a close
                    self.ctx.error("http2", f"{side.name} connection lost: {e}",
                                  address=self.up.address)
                return
            if not data:
                self._finish_forwarded(side)
                if self.by_client:
                    self.ctx.error("http2", f"{side.name} closed the connection with "
                                  f"{len(self.by_client)} stream(s) open", address=self.up.address)
                side.peer.conn.close_connection()
                side.peer.flush()
                return
            if side.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
                return  # the bridge already closed this side (GOAWAY sent): it is ending
            try:
                events = side.conn.receive_data(data)
                _check_frame_header(side.conn)
            except h2.exceptions.ProtocolError as e:
                self.ctx.error("http2", f"protocol error from the {side.name}: {e}",
                              address=self.up.address)
                side.flush()  # h2 queued a GOAWAY for the offender
                side.peer.conn.close_connection()
                side.peer.flush()
                return
            for ev in events:
                if self._handle(side, ev) is False:
                    side.flush()
                    side.peer.flush()
                    return
            side.flush()
            side.peer.flush()
            try:
                await side.peer.stream.drain()
                await side.stream.drain()
            except ConnectionError as e:
                self.ctx.error("http2", f"connection lost while writing: {e}",
                              address=self.up.address)
                return

    def _calm_down(self) -> None:
        """Too many streams opened and reset: end the client's connection (and so the
        upstream one, with whatever it still had open)."""
        self.ctx.error("http2", f"the client reset {self.cancelled} streams before their "
                       "responses (HTTP/2 rapid reset): connection closed with "
                       "ENHANCE_YOUR_CALM", address=self.up.address)
        self.client.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.server.conn.close_connection()

    def _goaway_both(self, message: str) -> None:
        self.ctx.error("http2", message, address=self.up.address)
        for s in (self.client, self.server):
            s.conn.close_connection()
            s.flush()

    # -- events --
    def _handle(self, side: Side, ev) -> bool | None:
        t = type(ev)
        if t is h2.events.DataReceived:
            self._data(side, ev)
        elif t is h2.events.RequestReceived:
            self._request(ev)
        elif t is h2.events.ResponseReceived:
            self._response(ev)
        elif t is h2.events.InformationalResponseReceived:
            pair = self.by_up.get(ev.stream_id)
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
            if ev.error_code != h2.errors.ErrorCodes.NO_ERROR or self.by_client:
                self.ctx.error("http2", f"{side.name} sent GOAWAY ({ev.error_code!s}, "
                              f"last stream {ev.last_stream_id})", address=self.up.address)
            side.peer.conn.close_connection()
            return False
        return None

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
        up_conn = self.server.conn
        try:
            up_id = up_conn.get_next_available_stream_id()
            up_conn.send_headers(up_id, out, end_stream=ev.stream_ended is not None)
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError) as e:
            self.ctx.error("http2", f"cannot open an upstream stream: {e}", flow=flow.flow,
                          address=self.up.address)
            self.client.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        pair = H2Stream(ev.stream_id, up_id, flow)
        pair.done_up = ev.stream_ended is not None
        self.by_client[ev.stream_id] = pair
        self.by_up[up_id] = pair

    def _response(self, ev: h2.events.ResponseReceived) -> None:
        pair = self.by_up.get(ev.stream_id)
        if pair is None:
            return
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

    def _data(self, side: Side, ev: h2.events.DataReceived) -> None:
        pair = (self.by_client if side is self.client else self.by_up).get(ev.stream_id)
        if pair is None:
            side.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return
        if pair.flow is not None:
            if side is self.client:
                pair.flow.request_data(ev.data)
            else:
                pair.flow.response_data(ev.data)
        target = side.peer
        tid = pair.up_id if side is self.client else pair.client_id
        q = target.pending.get(tid)
        if q is None:
            q = target.pending[tid] = Pending()
        q.chunks.append([ev.data, ev.flow_controlled_length])
        self._pump(target, tid)

    def _trailers(self, side: Side, ev: h2.events.TrailersReceived) -> None:
        pair = (self.by_client if side is self.client else self.by_up).get(ev.stream_id)
        if pair is None:
            return
        tid = pair.up_id if side is self.client else pair.client_id
        q = side.peer.pending.setdefault(tid, Pending())
        q.trailers = _forwardable(list(ev.headers))

    def _ended(self, side: Side, sid: int) -> None:
        pair = (self.by_client if side is self.client else self.by_up).get(sid)
        if pair is None:
            return
        if side is self.client and pair.done_up and pair.up_id not in self.server.pending:
            return  # ended with its headers: already sent with END_STREAM
        if side is self.server and pair.done_down:
            return
        tid = pair.up_id if side is self.client else pair.client_id
        q = side.peer.pending.setdefault(tid, Pending())
        q.ended = True
        self._pump(side.peer, tid)

    def _pump(self, target: Side, tid: int) -> None:
        """Send what the window allows; acknowledge it to the source; finish the stream."""
        q = target.pending.get(tid)
        if q is None:
            return
        source = target.peer
        pair = (self.by_up if target is self.server else self.by_client).get(tid)
        sid = None if pair is None else (pair.client_id if target is self.server else pair.up_id)
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
                if sid is not None and ack:
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
                    if target is self.server:
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
        if unacked and source_sid is not None:
            try:
                target.peer.conn.acknowledge_received_data(unacked, source_sid)
            except h2.exceptions.ProtocolError:
                pass

    def _finish(self, pair: H2Stream) -> None:
        """The response is complete towards the client: record it, forget the pair."""
        if pair.flow is not None:
            pair.flow.respond(pair.status, hdr.reason_phrase(pair.status), pair.resp_headers)
            self.answered += 1
            pair.flow = None
        self._drop(self.server, pair.up_id, pair.client_id)  # upload the origin did not read
        self.by_client.pop(pair.client_id, None)
        self.by_up.pop(pair.up_id, None)

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
        pair = (self.by_client if side is self.client else self.by_up).get(ev.stream_id)
        if pair is None:
            return False
        code = ev.error_code
        other, oid = (self.server, pair.up_id) if side is self.client else (
            self.client, pair.client_id)
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
        self.by_up.pop(pair.up_id, None)
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
        self.by_up.clear()
