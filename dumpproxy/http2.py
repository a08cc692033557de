"""The HTTP/2 bridge: an h2 connection with the client, one with the origin, streams paired.

Each client stream is forwarded on its own upstream stream and recorded as its own flow.
A pair has two legs, one per direction; each leg holds what its source sent until the
target's flow-control window takes it. Flow control is end to end: data received on one
side is acknowledged (its window reopened) only when it has been sent on the other side,
so a slow reader throttles the writer and each connection buffers at most its receive
window.

A graceful GOAWAY (NO_ERROR) ends nothing at once. From the origin (nginx sends one after
`keepalive_requests`): its streams up to the last-stream-id finish on that connection,
streams above it (never processed) and new client streams go to a fresh upstream
connection (`Upstreams`), and the client's connection carries on. From the client: its
open streams finish, then the bridge ends.

The connections themselves (settings, h2 patches, frame guards) are in `h2conn`.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import ssl
import time
from collections import deque

import h2.errors
import h2.events
import h2.exceptions

from dumpproxy import headers as hdr
from dumpproxy.addresses import join_host_port
from dumpproxy.context import Context
from dumpproxy.flows import Flow
from dumpproxy.h2conn import MAX_STREAMS, Connection, goaway, never_indexed, new_connection
from dumpproxy.replay import MAX_REQUEST_BODY, Recorded
from dumpproxy.replay import Request as ReplayRequest
from dumpproxy.replaysource import BodyUnreadable, recorded_response
from dumpproxy.schema import Aborted, Stage
from dumpproxy.streams import Stream, StreamTimeout
from dumpproxy.upstream import Upstream, UpstreamError

# Rapid Reset (CVE-2023-44487): streams a client may open and reset before getting their
# response, beyond one per response it did get (nginx and h2o account the same way). Past
# that the client gets GOAWAY ENHANCE_YOUR_CALM: the origin never sees more streams opened
# than about the concurrency limit, however fast the client resets.
RESET_ALLOWANCE = MAX_STREAMS
H2_ALPN = "h2"
# What a client resets a stream with when it no longer wants the response (a browser
# navigating away): orderly, no error.
CANCELS = (h2.errors.ErrorCodes.CANCEL, h2.errors.ErrorCodes.NO_ERROR)


class Leg(enum.Enum):
    """Where one direction of a paired stream is."""

    OPEN = "the source is sending"
    ENDED = "the source ended the stream: what waits goes out, then END_STREAM"
    CLOSED = "END_STREAM sent to the target (or the stream was reset)"


class Phase(enum.Enum):
    """Where a paired stream is, as far as its upstream connection goes."""

    QUEUED = "waiting for an upstream connection"
    SENT = "request headers sent upstream, no response yet"
    ANSWERED = "the response head went to the client"


class Direction:
    """One direction of a pair: the source's bytes waiting for the target's window, with
    what to acknowledge to the source once sent."""

    __slots__ = ("chunks", "state", "trailers", "sent")

    def __init__(self) -> None:
        self.chunks: deque[list] = deque()  # [data, unacknowledged flow-controlled length]
        self.state = Leg.OPEN
        self.trailers: list | None = None
        self.sent = 0  # body bytes sent to the target

    @property
    def waiting(self) -> bool:
        """Something is left to send: data, or the stream's end."""
        return bool(self.chunks) or self.state is Leg.ENDED


class Pair:
    """A client stream and its upstream stream, with its flow."""

    __slots__ = ("client_id", "up_id", "up_side", "flow", "phase", "up", "down", "request",
                 "status", "resp_headers", "since")

    def __init__(self, client_id: int, flow: Flow | None, request: list):
        self.client_id = client_id
        self.up_id = 0
        self.up_side: ServerSide | None = None  # None while QUEUED
        self.flow = flow
        self.phase = Phase.QUEUED
        self.up = Direction()  # client -> origin
        self.down = Direction()  # origin -> client
        self.request: list | None = request  # the headers to send upstream (or replay)
        self.status = 0
        self.resp_headers: list = []
        self.since = 0.0  # when the origin was last waited for: request end, last data

    @property
    def replayable(self) -> bool:
        """Never processed upstream and nothing of its body sent: it may go elsewhere."""
        return self.phase is Phase.SENT and not self.up.sent


class Side:
    """One HTTP/2 connection of the bridge. Data arriving on a side travels along the
    pair's `inbound` direction; data for it along `outbound`."""

    name = ""

    def __init__(self, stream: Stream, conn: Connection):
        self.stream = stream
        self.conn = conn
        self.closed = False  # writing failed: the peer is gone, its loop ends
        self.pairs: dict[int, Pair] = {}  # by this side's stream id
        self.blocked: dict[int, Pair] = {}  # pairs with data for this side awaiting window
        self.goaway: int | None = None  # last stream id of a graceful GOAWAY received

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.stream.write(data)
            except (ConnectionError, ssl.SSLError):
                self.closed = True  # the peer is gone (e.g. TLS saw EOF); its loop ends

    def id_of(self, pair: Pair) -> int:
        raise NotImplementedError

    def inbound(self, pair: Pair) -> Direction:
        raise NotImplementedError

    def outbound(self, pair: Pair) -> Direction:
        raise NotImplementedError

    def source(self, pair: Pair) -> tuple[Side | None, int]:
        """Where this side's outbound data of the pair comes from (side, its stream id)."""
        raise NotImplementedError

    def target(self, pair: Pair) -> tuple[Side | None, int]:
        """Where this side's inbound data of the pair goes (None while not attached)."""
        raise NotImplementedError

    def record(self, flow: Flow, data: bytes) -> None:
        """Record body bytes sent to this side (the flow counts what was forwarded)."""
        raise NotImplementedError


class ClientSide(Side):
    name = "client"

    def id_of(self, pair: Pair) -> int:
        return pair.client_id

    def inbound(self, pair: Pair) -> Direction:
        return pair.up

    def outbound(self, pair: Pair) -> Direction:
        return pair.down

    def source(self, pair: Pair) -> tuple[Side | None, int]:
        return pair.up_side, pair.up_id

    def target(self, pair: Pair) -> tuple[Side | None, int]:
        return pair.up_side, pair.up_id

    def record(self, flow: Flow, data: bytes) -> None:
        flow.response_data(data)


class ServerSide(Side):
    name = "server"

    def __init__(self, stream: Stream, conn: Connection, up: Upstream, client: ClientSide):
        super().__init__(stream, conn)
        self.up = up
        self.client = client
        self.waiting: deque[Pair] = deque()  # for a stream slot (the origin's concurrency)

    @property
    def has_room(self) -> bool:
        """The origin's SETTINGS_MAX_CONCURRENT_STREAMS allows one more stream."""
        return self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams

    def id_of(self, pair: Pair) -> int:
        return pair.up_id

    def inbound(self, pair: Pair) -> Direction:
        return pair.down

    def outbound(self, pair: Pair) -> Direction:
        return pair.up

    def source(self, pair: Pair) -> tuple[Side | None, int]:
        return self.client, pair.client_id

    def target(self, pair: Pair) -> tuple[Side | None, int]:
        return self.client, pair.client_id

    def record(self, flow: Flow, data: bytes) -> None:
        flow.request_data(data)


def _server_of(pair: Pair) -> int | None:
    return pair.up_side.up.id if pair.up_side is not None else None


def _regular(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields that are not pseudo-headers (as received: HPACK's marks kept)."""
    return [h for h in headers if not h[0].startswith(b":")]


def _pseudo(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {n: v for n, v in headers if n.startswith(b":")}


def _forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return never_indexed(headers, hdr.forwardable(headers, http2=True))


def _discard(leg: Direction, source: Side | None, sid: int) -> None:
    """Drop what waits in this direction, giving its window back to the sender:
    unacknowledged bytes would shrink the source connection's window for good."""
    unacked = sum(item[1] for item in leg.chunks)
    leg.chunks.clear()
    if unacked and source is not None:
        try:
            source.conn.acknowledge_received_data(unacked, sid)
        except h2.exceptions.ProtocolError:
            pass


class ResetBudget:
    """Rapid-reset accounting: streams the client cancelled against responses it got."""

    __slots__ = ("answered", "cancelled")

    def __init__(self) -> None:
        self.answered = 0  # responses completed towards the client
        self.cancelled = 0  # streams the client reset before their response was complete

    def cancel(self) -> bool:
        """One more cancelled stream; True when the client is over its allowance."""
        self.cancelled += 1
        return self.cancelled > RESET_ALLOWANCE + self.answered


class Upstreams:
    """The bridge's upstream connections: where new streams go, and a fresh connection
    when the current one said GOAWAY (or closed while idle). Streams wait in a queue while
    it is being opened."""

    def __init__(self, bridge: H2Bridge, first: ServerSide | None):
        self.bridge = bridge
        # the first one (none yet under replay: opened for a forwarded miss), and any after
        self.servers: list[ServerSide] = [first] if first is not None else []
        self.current: ServerSide | None = first  # where new streams go; None: being opened
        self.queued: list[Pair] = []  # streams waiting for a fresh upstream connection
        self.connecting: asyncio.Future | None = None

    def place(self, pair: Pair) -> None:
        """Send the pair's request on the current connection, or queue it for the next."""
        side = self.current
        if side is not None and side.goaway is None and not side.closed:
            if side.has_room and not side.waiting:
                self.bridge.attach(pair, side)
            else:  # the origin's concurrency limit: it waits for a stream to end
                side.waiting.append(pair)
            return
        self.current = None
        self.queued.append(pair)
        if self.connecting is None:
            self.connecting = self.bridge.spawn(self._connect())

    def freed(self, side: ServerSide) -> None:
        """A stream of this connection ended (or its limit rose): the next waiting go."""
        bridge = self.bridge
        while side.waiting and side.has_room and side.goaway is None and not side.closed:
            pair = side.waiting.popleft()
            if bridge.client.pairs.get(pair.client_id) is pair:
                bridge.attach(pair, side)

    def _replace(self, side: ServerSide) -> None:
        """Streams waiting for a slot on a connection that takes no more: elsewhere."""
        waiting, side.waiting = side.waiting, deque()
        for pair in waiting:
            if self.bridge.client.pairs.get(pair.client_id) is pair:
                self.place(pair)

    def goaway(self, side: ServerSide, last_stream_id: int) -> None:
        """A graceful GOAWAY from this upstream: streams above last_stream_id were not
        processed; they are replayed on a fresh connection when nothing of their body went
        out, else refused."""
        if self.current is side:
            self.current = None
        for up_id, pair in sorted(side.pairs.items()):
            if up_id <= last_stream_id:
                continue
            del side.pairs[up_id]
            side.blocked.pop(up_id, None)
            if not pair.replayable:  # the client may retry it: orderly, no error
                self.bridge.refuse(pair)
                continue
            pair.up_side, pair.up_id, pair.phase = None, 0, Phase.QUEUED
            if pair.up.state is Leg.CLOSED:  # its end goes to the new connection too
                pair.up.state = Leg.ENDED
            self.place(pair)
        self._replace(side)

    def retire(self, side: ServerSide) -> None:
        """A server connection is done: new streams go to a fresh one."""
        if self.current is side:
            self.current = None
        side.up.release()
        if side in self.servers:
            self.servers.remove(side)
            side.blocked.clear()
        self._replace(side)

    async def _connect(self) -> None:
        bridge = self.bridge
        ctx = bridge.ctx
        try:
            try:
                up = await ctx.open_upstream(bridge.dest_host, bridge.port,
                                             (bridge.host, (H2_ALPN,)))
            except UpstreamError as e:
                self._refuse_queued(e.stage, e.message)  # type: ignore[arg-type]
                return
            if up.tls is None or up.tls.ssl.selected_alpn_protocol() != H2_ALPN:
                up.release()
                self._refuse_queued("upstream", f"{up.address} no longer speaks HTTP/2")
                return
            side = ServerSide(up.stream, new_connection(client_side=True), up, bridge.client)
            self.servers.append(side)
            side.flush()
            self.current = side
            bridge.spawn(bridge.server_loop(side))
            queued, self.queued = self.queued, []
            for pair in queued:
                if bridge.client.pairs.get(pair.client_id) is pair:
                    bridge.attach(pair, side)
            bridge.flush_all()
        finally:
            self.connecting = None

    def _refuse_queued(self, stage: Stage, message: str) -> None:
        """No fresh connection: the waiting streams are refused, each with the error."""
        queued, self.queued = self.queued, []
        bridge = self.bridge
        if not queued:
            bridge.ctx.error(stage, message, address=bridge.address)
        for pair in queued:
            if bridge.client.pairs.get(pair.client_id) is pair:
                bridge.refuse(pair, stage, message)
        bridge.client.flush()


class H2Bridge:
    def __init__(self, ctx: Context, client: Stream, up: Upstream | None, scheme: str,
                 host: str, authority: bytes | None = None,
                 destination: tuple[str, int] | None = None):
        """up: the first upstream connection; None under replay (destination: where one
        goes when a miss is forwarded)."""
        self.ctx = ctx
        if up is not None:
            destination = (up.host, up.port)
        assert destination is not None
        # where upstream connections go (their address names the events)
        self.dest_host, self.port = destination
        self.address = join_host_port(self.dest_host, self.port)
        self.scheme = scheme
        self.host = host  # as the HTTP/1 bridge names it: the SNI, else the CONNECT host
        self.authority = authority  # reverse mode: every request's :authority
        self.client = ClientSide(client, new_connection(client_side=False))
        self.upstreams = Upstreams(self, ServerSide(
            up.stream, new_connection(client_side=True), up, self.client)
            if up is not None else None)
        self.replay = ctx.cfg.replay
        # streams whose request is read whole before it is matched (replay), by client id
        self.matching: dict[int, ReplayRequest] = {}
        self.resets = ResetBudget()
        self._tasks: set[asyncio.Future] = set()
        self._end: asyncio.Future | None = None
        self.cut_by: Aborted = "client"  # whose end cut the streams still open at the end
        self._last_byte = time.monotonic()  # the last byte received, from either side
        self._goodbye = False  # our GOAWAY went to the client (the proxy is stopping)

    # -- tasks --
    def spawn(self, coro) -> asyncio.Future:
        task = self.ctx.loop.create_task(coro)
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

    def _finish_bridge(self, cut_by: Aborted | None = None) -> None:
        """End the bridge; cut_by: whose doing, for the streams still open."""
        if self._end is not None and not self._end.done():
            if cut_by is not None:
                self.cut_by = cut_by
            self._end.set_result(None)

    async def run(self) -> None:
        self._end = self.ctx.loop.create_future()
        for first in self.upstreams.servers:
            first.flush()
            self.spawn(self.server_loop(first))
        self.client.flush()
        self.spawn(self._watch())
        client = self.spawn(self._client_loop())
        client.add_done_callback(lambda _: self._finish_bridge())
        self.ctx.quiesce = self._quiesce
        try:
            await self._end
        except asyncio.CancelledError:
            self.cut_by = "shutdown"
            raise
        finally:
            self.ctx.quiesce = None
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._finish_forwarded()  # e.g. shutdown right after the last byte
            self._cut_open_streams()
            servers = self.upstreams.servers
            for side in servers:
                side.up.release()
            # h2's connection objects hold reference cycles; left to the cyclic GC they
            # pile up between its rare full passes. Collect them once per connection.
            for side in (self.client, *servers):
                side.blocked.clear()
                side.pairs.clear()
            servers.clear()
            self.upstreams.queued.clear()
            gc.collect()

    def _quiesce(self) -> bool:
        """The proxy is stopping: tell the client to open no more streams (once); the
        connection may close when none is open."""
        if not self._goodbye:
            self._goodbye = True
            try:
                self.client.stream.write(goaway(self.client.conn.highest_inbound_stream_id))
            except ConnectionError:
                pass
        return not self.client.pairs

    def flush_all(self) -> None:
        self.client.flush()
        for s in self.upstreams.servers:
            s.flush()

    # -- loops --
    async def _read(self, side: Side) -> bytes | None:
        """The side's next bytes; None when its loop is over (its end already handled).
        Idle means no byte either way (on any of the bridge's connections)."""
        idle = self.ctx.cfg.idle_timeout
        while True:
            try:
                data = await side.stream.read(idle)
            except StreamTimeout:
                if time.monotonic() - self._last_byte < idle or any(
                        p.phase is not Phase.QUEUED and p.down.state is not Leg.CLOSED
                        for p in self.client.pairs.values()):
                    continue  # quiet here only; or streams wait on the origin (_watch)
                self._goaway_all(f"no data either way for {idle:g} s")
                self._finish_bridge("client")
                return None
            self._last_byte = time.monotonic()
            return data

    async def _watch(self) -> None:
        """Each stream's own limits: its response head within --response-timeout of the
        request's end (else 504), then no stall over --idle-timeout mid-body (else cut)."""
        cfg = self.ctx.cfg
        tick = min(max(min(cfg.response_timeout, cfg.idle_timeout) / 4, 0.05), 1.0)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for pair in list(self.client.pairs.values()):
                if pair.up_side is None or pair.flow is None:
                    continue
                if pair.phase is Phase.SENT and pair.up.state is Leg.CLOSED:
                    if now - pair.since > cfg.response_timeout:
                        self._timed_out(pair)
                elif (pair.phase is Phase.ANSWERED and pair.down.state is Leg.OPEN
                      and not pair.down.chunks and now - pair.since > cfg.idle_timeout):
                    self._stalled(pair)  # (a client slow to read is not the origin's stall)
            self.flush_all()

    def _timed_out(self, pair: Pair) -> None:
        """No response head in time: the origin's stream is cancelled, the client gets 504
        (as an HTTP/1 client would), and the error says so."""
        side = pair.up_side
        assert side is not None
        message = f"no response from {self.address} within " \
                  f"{self.ctx.cfg.response_timeout:g} s"
        try:
            side.conn.reset_stream(pair.up_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._answer(pair, 504, message, "upstream")

    def _answer(self, pair: Pair, status: int, message: str, stage: Stage) -> None:
        """dumpproxy answers the stream itself: an `error` and the message as the body."""
        self._error(message, pair, stage)
        body = (message + "\n").encode()
        self._respond(pair, status, [(b"content-type", b"text/plain; charset=utf-8"),
                                     (b"content-length", str(len(body)).encode())], body)

    def _respond(self, pair: Pair, status: int, headers: list, body: bytes) -> None:
        """A response of dumpproxy's own (or the record's) to the client's stream."""
        pair.status, pair.phase = status, Phase.ANSWERED
        pair.resp_headers = headers
        self._send_headers(self.client, pair.client_id,
                           [(b":status", str(status).encode()), *headers], end_stream=not body)
        if not body:
            pair.down.state = Leg.CLOSED
            self._finish(pair)
            return
        pair.down.chunks.append([body, 0])
        pair.down.state = Leg.ENDED
        self._pump(self.client, pair)

    def _stalled(self, pair: Pair) -> None:
        """The origin stopped mid-body for the idle timeout: the stream is cut both ways."""
        side = pair.up_side
        assert side is not None
        self._error(f"{self.address} stalled mid-response: no data for "
                    f"{self.ctx.cfg.idle_timeout:g} s", pair, "upstream")
        for conn, sid in ((side.conn, pair.up_id), (self.client.conn, pair.client_id)):
            try:
                conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
        self._drop(self.client, pair)
        self._cut(pair, "server")
        self._forget(pair)

    def _receive(self, side: Side, data: bytes) -> bool:
        """Feed the side's bytes to h2 and handle its events; False: this side is over."""
        try:
            events = side.conn.receive(data)
        except h2.exceptions.ProtocolError as e:
            self._error(f"protocol error from the {side.name}: {e}")
            side.flush()  # h2 queued a GOAWAY for the offender
            self._close_all_but(side)
            self._finish_bridge(side.name)  # type: ignore[arg-type]
            return False
        for ev in events:
            if self._handle(side, ev) is False:
                self.flush_all()
                return False
        self.flush_all()
        return True

    async def _client_loop(self) -> None:
        side = self.client
        while True:
            try:
                data = await self._read(side)
            except ConnectionError:  # the client went away: its open streams are cut
                self._finish_forwarded()
                return
            if data is None:
                return
            if not data:
                self._finish_forwarded()
                self._close_all_but(side)
                return
            if side.conn.closed:
                return  # the bridge already closed this side (GOAWAY sent): it is ending
            if not self._receive(side, data):
                return
            if side.goaway is not None and not side.pairs:
                self._close_side(side)  # the client said goodbye and all is answered
                return
            try:
                for s in self.upstreams.servers:
                    await s.stream.drain()
                await side.stream.drain()
            except ConnectionError:
                return  # the client is gone

    async def server_loop(self, side: ServerSide) -> None:
        client = self.client
        while True:
            try:
                data = await self._read(side)
            except ConnectionError as e:
                if side.pairs:
                    self._server_broke(side, f"server connection lost: {e}")
                else:
                    self.upstreams.retire(side)
                return
            if data is None:
                return
            if not data:
                if side.pairs:
                    self._server_broke(side, f"server closed the connection with "
                                       f"{len(side.pairs)} stream(s) open")
                else:  # an idle upstream closed (or one that sent GOAWAY): open anew later
                    self.upstreams.retire(side)
                return
            if side.conn.closed:
                return
            if not self._receive(side, data):
                return
            if client.goaway is not None and not client.pairs:
                self._close_side(client)
                self._finish_bridge()
                return
            if side.goaway is not None and not side.pairs:
                self._close_side(side)  # drained after its GOAWAY
                self.upstreams.retire(side)
                return
            try:
                await client.stream.drain()
            except ConnectionError:
                self._finish_bridge("client")
                return
            try:
                await side.stream.drain()
            except ConnectionError as e:
                self._server_broke(side, f"server connection lost while writing: {e}")
                return

    # -- ending connections --
    def _error(self, message: str, pair: Pair | None = None, stage: Stage = "http2") -> None:
        flow = pair.flow.flow if pair is not None and pair.flow is not None else None
        self.ctx.error(stage, message, flow=flow, address=self.address)

    def _server_broke(self, side: ServerSide, message: str) -> None:
        """An upstream connection broke with streams open: the whole bridge ends (the
        client's streams on it cannot go on), each open exchange cut by the server."""
        self._error(message)
        self._close_all_but(side)
        self._finish_bridge("server")

    def _close_side(self, side: Side) -> None:
        """Our own graceful GOAWAY on this side."""
        if not side.conn.closed:
            try:
                side.conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            side.flush()

    def _close_all_but(self, side: Side) -> None:
        for s in (self.client, *self.upstreams.servers):
            if s is not side:
                self._close_side(s)

    def _calm_down(self) -> None:
        """Too many streams opened and reset: end the client's connection (and so the
        upstream ones, with whatever they still had open)."""
        self._error(f"the client reset {self.resets.cancelled} streams before their "
                    "responses (HTTP/2 rapid reset): connection closed with ENHANCE_YOUR_CALM")
        self.client.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._close_all_but(self.client)
        self._finish_bridge("client")

    def _goaway_all(self, message: str) -> None:
        self._error(message)
        for s in (self.client, *self.upstreams.servers):
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
            self._response(side, ev)
        elif t is h2.events.InformationalResponseReceived:
            pair = side.pairs.get(ev.stream_id)
            if pair is not None:
                self._send_headers(self.client, pair.client_id, _forwardable(ev.headers))
        elif t is h2.events.TrailersReceived:
            pair = side.pairs.get(ev.stream_id)
            if pair is not None:
                side.inbound(pair).trailers = _forwardable(list(ev.headers))
        elif t is h2.events.StreamEnded:
            self._ended(side, ev.stream_id)
        elif t is h2.events.WindowUpdated:
            if ev.stream_id == 0:
                for pair in list(side.blocked.values()):
                    self._pump(side, pair)
            else:
                pair = side.blocked.get(ev.stream_id)
                if pair is not None:
                    self._pump(side, pair)
        elif t is h2.events.RemoteSettingsChanged:
            for pair in list(side.blocked.values()):
                self._pump(side, pair)
            if isinstance(side, ServerSide):
                self.upstreams.freed(side)
        elif t is h2.events.StreamReset:
            if self._reset(side, ev) and side is self.client and self.resets.cancel():
                self._calm_down()
                return False
        elif t is h2.events.ConnectionTerminated:
            if ev.error_code == h2.errors.ErrorCodes.NO_ERROR:
                side.goaway = ev.last_stream_id
                side.stream.mark("peer_closed")  # how the connection ends, said by the peer
                if isinstance(side, ServerSide):
                    self.upstreams.goaway(side, ev.last_stream_id)
                # a client's open streams finish; its loop ends the bridge after them
                return None
            self._error(f"{side.name} sent GOAWAY ({ev.error_code!s}, "
                        f"last stream {ev.last_stream_id})")
            self._close_all_but(side)
            self._finish_bridge(side.name)  # type: ignore[arg-type]
            return False
        return None

    def _request(self, ev: h2.events.RequestReceived) -> None:
        headers = list(ev.headers)
        pseudo = _pseudo(headers)
        method = pseudo.get(b":method", b"").decode("latin-1")
        path = pseudo.get(b":path", b"/").decode("latin-1")
        regular = _regular(headers)
        flow = Flow(self.ctx, method, self.scheme, self.host, self.port, path,
                    "HTTP/2.0", regular)
        out = [h for h in headers if h[0].startswith(b":")] + _forwardable(regular)
        if self.authority is not None:  # reverse mode: the target's, whatever the client said
            out = [(b":authority", self.authority) if h[0] == b":authority" else h
                   for h in out if h[0] != b"host"]
        pair = Pair(ev.stream_id, flow, out)
        if ev.stream_ended is not None:
            pair.up.state = Leg.ENDED
        self.client.pairs[ev.stream_id] = pair
        if self.replay is not None:  # matched once its body is in (SPEC §9.3)
            self.matching[ev.stream_id] = ReplayRequest(
                method.upper(), self.scheme, self.host, self.port, path)
            if pair.up.state is Leg.ENDED:
                self._replay(pair)
            return
        self.upstreams.place(pair)

    def attach(self, pair: Pair, side: ServerSide) -> None:
        """Send a stream's request headers (and whatever waited) on this connection."""
        conn, leg = side.conn, pair.up
        ended = leg.state is Leg.ENDED and not leg.chunks and leg.trailers is None
        try:
            up_id = conn.get_next_available_stream_id()
            conn.send_headers(up_id, pair.request, end_stream=ended)
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError) as e:
            self.refuse(pair, "http2", f"cannot open an upstream stream: {e}")
            return
        pair.up_id, pair.up_side, pair.phase = up_id, side, Phase.SENT
        side.pairs[up_id] = pair
        if ended:
            leg.state = Leg.CLOSED
            pair.since = time.monotonic()
        elif leg.waiting:
            self._pump(side, pair)

    def refuse(self, pair: Pair, stage: Stage | None = None, message: str = "") -> None:
        """The client's stream was not processed upstream: REFUSED_STREAM (a client may
        retry it); recorded as cut by the server, with the error that says why (none when
        the origin declined it gracefully: GOAWAY)."""
        if stage is not None:
            self._error(message, pair, stage)
        self._cut(pair, "server")
        _discard(pair.up, self.client, pair.client_id)  # its window back to the client
        self.client.pairs.pop(pair.client_id, None)
        try:
            self.client.conn.reset_stream(pair.client_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def _response(self, side: Side, ev: h2.events.ResponseReceived) -> None:
        pair = side.pairs.get(ev.stream_id)
        if pair is None:
            return
        pair.phase = Phase.ANSWERED
        pair.since = time.monotonic()
        pair.request = None  # never replayed now
        headers = list(ev.headers)
        status = _pseudo(headers).get(b":status", b"0")
        pair.status = int(status) if status.isdigit() else 0
        pair.resp_headers = _regular(headers)
        out = [(b":status", status)] + _forwardable(pair.resp_headers)
        ended = ev.stream_ended is not None
        self._send_headers(self.client, pair.client_id, out, end_stream=ended)
        if ended:
            pair.down.state = Leg.CLOSED
            self._finish(pair)

    def _send_headers(self, side: Side, sid: int, headers: list, end_stream: bool = False):
        try:
            side.conn.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            pass

    def _data(self, side: Side, ev: h2.events.DataReceived) -> None:
        pair = side.pairs.get(ev.stream_id)
        if pair is None:
            side.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            return
        side.inbound(pair).chunks.append([ev.data, ev.flow_controlled_length])
        if isinstance(side, ServerSide):
            pair.since = time.monotonic()
        target, _ = side.target(pair)
        if target is not None:  # else: its upstream is being opened
            self._pump(target, pair)
        elif ev.stream_id in self.matching and side is self.client:
            # its body is read whole before it is matched: acknowledged as it comes
            side.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            pair.up.chunks[-1][1] = 0
            if sum(len(c[0]) for c in pair.up.chunks) > MAX_REQUEST_BODY:
                del self.matching[ev.stream_id]
                self._answer(pair, 413, f"request body over {MAX_REQUEST_BODY} bytes: too "
                             "large to match against the replay files", "replay")

    def _ended(self, side: Side, sid: int) -> None:
        pair = side.pairs.get(sid)
        if pair is None:
            return
        leg = side.inbound(pair)
        if leg.state is not Leg.OPEN:
            return  # ended with its headers: sent with END_STREAM already
        leg.state = Leg.ENDED
        target, _ = side.target(pair)
        if target is not None:
            self._pump(target, pair)
        elif sid in self.matching and side is self.client:
            self._replay(pair)

    # -- replay (SPEC §9.3) --
    def _replay(self, pair: Pair) -> None:
        """A request read whole: answered from the record, refused, or forwarded."""
        replay, rq = self.replay, self.matching.pop(pair.client_id)
        assert replay is not None and pair.flow is not None
        body = b"".join(c[0] for c in pair.up.chunks)
        rec = replay.match(rq, body)
        if rec is None and replay.forward:
            self.upstreams.place(pair)
            return
        pair.flow.request_data(body)
        pair.up.chunks.clear()
        if rec is None:
            self._answer(pair, 502, replay.miss_message(rq), "replay")
            return
        self.spawn(self._serve_recorded(pair, rec, rq.method))

    async def _serve_recorded(self, pair: Pair, rec: Recorded, method: str) -> None:
        """The recorded response, once its body is read."""
        try:
            headers, data = await recorded_response(rec, method)
        except BodyUnreadable as e:
            if self.client.pairs.get(pair.client_id) is pair:
                self._answer(pair, 502, str(e), "replay")
                self.flush_all()
            return
        if self.client.pairs.get(pair.client_id) is not pair or pair.flow is None:
            return  # reset while its body was read
        pair.flow.replayed = rec.source
        self._respond(pair, rec.status, headers, data)
        self.flush_all()

    def _pump(self, target: Side, pair: Pair) -> None:
        """Send what target's window allows of the pair's data for it; acknowledge it to
        the source; end the stream once all is out."""
        leg = target.outbound(pair)
        tid = target.id_of(pair)
        source, sid = target.source(pair)
        conn = target.conn
        try:
            while leg.chunks:
                window = conn.local_flow_control_window(tid)
                if window <= 0:
                    target.blocked[tid] = pair
                    return
                item = leg.chunks[0]
                data = item[0]
                n = min(len(data), window, conn.max_outbound_frame_size)
                if n < len(data):
                    piece = data[:n]
                    item[0] = data[n:]
                    ack = min(n, item[1])  # less when acknowledged already (replay)
                else:
                    piece = data
                    leg.chunks.popleft()
                    ack = item[1]  # includes padding
                conn.send_data(tid, piece)
                if pair.flow is not None:
                    target.record(pair.flow, piece)
                item[1] -= ack
                leg.sent += n
                if ack and source is not None:
                    try:
                        source.conn.acknowledge_received_data(ack, sid)
                    except h2.exceptions.StreamClosedError:
                        pass
            target.blocked.pop(tid, None)
            if leg.state is Leg.ENDED:
                if leg.trailers is not None:
                    conn.send_headers(tid, leg.trailers, end_stream=True)
                else:
                    conn.end_stream(tid)
                leg.state = Leg.CLOSED
                if leg is pair.down:
                    self._finish(pair)
                else:  # the request is whole: the wait for its response starts
                    pair.since = time.monotonic()
        except h2.exceptions.StreamClosedError:
            self._drop(target, pair)
        except h2.exceptions.FlowControlError:
            target.blocked[tid] = pair  # again when the window opens

    def _drop(self, target: Side, pair: Pair) -> None:
        """Discard what waits for target's stream of the pair (see `_discard`)."""
        target.blocked.pop(target.id_of(pair), None)
        source, sid = target.source(pair)
        _discard(target.outbound(pair), source, sid)

    # -- recording --
    def _cut(self, pair: Pair, by: Aborted) -> None:
        """Record the exchange as cut short, with what it had moved."""
        if pair.flow is not None:
            pair.flow.respond(pair.status, hdr.reason_phrase(pair.status) if pair.status
                              else "", pair.resp_headers, by, _server_of(pair))
            pair.flow = None

    def _finish(self, pair: Pair) -> None:
        """The response is complete towards the client: record it, forget the pair."""
        if pair.flow is not None:
            pair.flow.respond(pair.status, hdr.reason_phrase(pair.status), pair.resp_headers,
                              server=_server_of(pair))
            self.resets.answered += 1
            pair.flow = None
        self._forget(pair)

    def _forget(self, pair: Pair) -> None:
        side = pair.up_side
        if side is not None:
            self._drop(side, pair)  # upload not read
            if pair.up.state is not Leg.CLOSED:  # the request never ended: end its stream,
                try:  # or it would hold one of the origin's concurrent streams for good
                    side.conn.reset_stream(pair.up_id, h2.errors.ErrorCodes.NO_ERROR)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                pair.up.state = Leg.CLOSED
            side.pairs.pop(pair.up_id, None)
            self.upstreams.freed(side)
        else:
            _discard(pair.up, self.client, pair.client_id)  # what waited for a connection
        self.client.blocked.pop(pair.client_id, None)
        self.client.pairs.pop(pair.client_id, None)

    def _finish_forwarded(self) -> None:
        """The client went away: record the exchanges it received whole (curl, for one,
        closes once content-length is met, before the origin's END_STREAM arrives)."""
        for pair in list(self.client.pairs.values()):
            if self._forwarded_whole(pair):
                self._finish(pair)

    def _forwarded_whole(self, pair: Pair) -> bool:
        """The whole response body (per content-length) reached the client; only the
        upstream's END_STREAM is missing."""
        if not pair.status or pair.flow is None:
            return False
        length = hdr.body_length(pair.flow.method, pair.status, pair.resp_headers)
        return length is not None and length == pair.flow.response_bytes

    def _reset(self, side: Side, ev: h2.events.StreamReset) -> bool:
        """Pass a reset on to the paired stream; True when it cut an exchange short."""
        pair = side.pairs.get(ev.stream_id)
        if pair is None:
            return False
        if side is self.client:
            self.matching.pop(ev.stream_id, None)  # replay: no longer to be matched
        other, oid = side.target(pair)
        if other is not None:
            try:
                other.conn.reset_stream(oid, ev.error_code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._drop(other, pair)
        if side is self.client and self._forwarded_whole(pair):
            # The client had the whole response (curl resets once Content-Length is met,
            # before the origin's END_STREAM): a completed exchange, not a failure.
            self._finish(pair)
            return False
        self._drop(side, pair)
        if isinstance(side, ServerSide) or ev.error_code not in CANCELS:
            name = getattr(ev.error_code, "name", str(ev.error_code))
            self._error(f"{side.name} reset the stream ({name})", pair)
        self._cut(pair, side.name)  # type: ignore[arg-type]
        self._forget(pair)
        return True

    def _cut_open_streams(self) -> None:
        """The bridge ended with exchanges open: each is cut by whoever ended it (an
        error for each, when that was the server)."""
        for pair in list(self.client.pairs.values()):
            if pair.flow is not None and self.cut_by == "server":
                self._error("connection closed before the response ended", pair)
            self._cut(pair, self.cut_by)
        self.client.pairs.clear()
