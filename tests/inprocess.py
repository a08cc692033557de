"""The in-process rig shared by the bridge tests: real services over in-memory streams.

The client is the test itself, the origin a coroutine written in the test, reached through
a `Connector` whose `tcp()` returns one end of an in-memory pipe (`memstream`). The rest is
real: Config, HostFilter, Services, Context and the bridges. Every event goes through JSON
and the schema check of conftest.

Each test runs in its own event loop, bounded by TIME_LIMIT so that a hang fails the test.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import orjson
from conftest import FLOW_CHECK, SCHEMA_CHECK, FlowCheck
from memstream import MemStream, pipe

from dumpproxy.addresses import join_host_port
from dumpproxy.certs import CertStore
from dumpproxy.config import Config
from dumpproxy.context import Context, Services
from dumpproxy.events import EventWriter
from dumpproxy.http1_server import Connect, Target, serve_http1
from dumpproxy.http2 import H2Bridge
from dumpproxy.streams import SocketStream, Stream, TLSStream
from dumpproxy.upstream import Connector, Upstream

TIME_LIMIT = 10.0  # seconds per test: far above what any of them needs, so only a hang trips it
ORIGIN_IP = "192.0.2.10"  # TEST-NET-1: where every origin "resolves"
PROXY_IP = "127.0.0.1"
CLIENT = "127.0.0.1:50001"  # the first client connection of a rig, as events name it

T = TypeVar("T")
Origin = Callable[[MemStream], Awaitable[Any]]


RECORDERS: list[Recorder] = []  # of the test running now: judged when it ends


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """One test's coroutine in a fresh event loop; a hang fails instead of blocking. Then,
    as at a proxy's shutdown, every request its rigs recorded must have its response."""
    RECORDERS.clear()
    try:
        return asyncio.run(asyncio.wait_for(main(), TIME_LIMIT))
    finally:
        for recorder in RECORDERS:
            FLOW_CHECK.judge(recorder.flows)
        RECORDERS.clear()


async def settle(rounds: int = 200) -> None:
    """Let every task run until nothing more happens: in memory, each hop of a byte takes
    a few loop iterations, never a wait."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- the proxy's side: real services over in-memory connections --------------------------


class Recorder(EventWriter):
    """Keeps events in memory, each checked against the schema as the JSON it would be."""

    def __init__(self) -> None:
        super().__init__(-1)  # no descriptor (set_blocking's EBADF is ignored); never flushed
        self.events: list[dict] = []
        self.flows = FlowCheck()
        RECORDERS.append(self)

    def write(self, ev: dict) -> None:
        self.events.append(SCHEMA_CHECK.check(orjson.loads(orjson.dumps(ev))))
        self.flows.feed(self.events[-1], FLOW_CHECK)


class MemConnector(Connector):
    """Every upstream connection is a pipe whose far end an origin coroutine serves."""

    def __init__(self, cfg: Config, origin: Origin):
        super().__init__(cfg)
        self.origin = origin
        self.connects: list[str] = []  #: host:port of each tcp() call
        self.ends: list[MemStream] = []  #: the origin's end of each connection
        self.tasks: list[asyncio.Task] = []  #: the origin coroutine of each connection

    async def tcp(self, host: str, port: int) -> SocketStream:
        self.connects.append(join_host_port(host, port))
        ours, theirs = pipe((PROXY_IP, 40000 + len(self.connects)), (ORIGIN_IP, port))
        self.ends.append(theirs)
        self.tasks.append(asyncio.ensure_future(self.origin(theirs)))
        return cast(SocketStream, ours)  # the SocketStream surface, duck-typed


class Rig:
    """One proxy run: configuration, services and the events they wrote."""

    def __init__(self, origin: Origin, **cfg: Any):
        self.cfg = Config(**cfg)
        self.recorder = Recorder()
        self.connector = MemConnector(self.cfg, origin)
        # No TLS to clients in these tests: no CA (a CertStore would write one to disk).
        self.services = Services(self.cfg, self.recorder, self.cfg.sources.load(),
                                 cast(CertStore, None), self.connector)
        self.bridges: list[H2Bridge] = []  #: the HTTP/2 bridges h2_start made
        self._conns = 0

    def connect(self) -> tuple[Context, MemStream]:
        """A new client connection: the proxy's context over one end, the test's end."""
        self._conns += 1
        client, proxy_end = pipe(("127.0.0.1", 50000 + self._conns), (PROXY_IP, 8080))
        return Context(self.services, cast(SocketStream, proxy_end), self._conns), client

    async def serve(self, ctx: Context, target: Target | None = None) -> Connect | None:
        """serve_http1 as the proxy runs it: the connection and its upstreams closed after."""
        try:
            return await serve_http1(ctx, ctx.stream, target)
        finally:
            ctx.close()

    def start(self, target: Target | None = None) -> tuple[MemStream, asyncio.Task]:
        """An HTTP/1 client connection served as the proxy serves it."""
        ctx, client = self.connect()
        return client, asyncio.ensure_future(self.serve(ctx, target))

    async def origins(self) -> list:
        """What each origin connection's coroutine returned, in connection order."""
        return await asyncio.gather(*self.connector.tasks)

    @property
    def events(self) -> list[dict]:
        return self.recorder.events

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def check_disconnect(self, ev: dict, index: int = 0) -> None:
        """server_disconnect counts what the origin's end of that connection saw."""
        end = self.connector.ends[index]
        assert (ev["bytes_sent"], ev["bytes_received"]) == (end.bytes_in, end.bytes_out)
        assert ev["bytes_sent"] > 0


# --- HTTP/2 peers ------------------------------------------------------------------------


@dataclass
class H2Msg:
    """What one side received on one stream."""

    headers: list = field(default_factory=list)
    body: bytes = b""
    trailers: list = field(default_factory=list)
    ended: bool = False
    reset: h2.errors.ErrorCodes | int | None = None
    informational: list[list] = field(default_factory=list)  # 1xx heads, in order

    def pseudo(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


@dataclass
class Frame:
    """One frame as it came off the wire."""

    kind: str  # "DATA", "HEADERS", "RST_STREAM", ...
    stream_id: int
    flags: frozenset[str]
    length: int


_FRAME_NAMES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS",
                5: "PUSH_PROMISE", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE",
                9: "CONTINUATION"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameLog:
    """Every frame a peer received, in order (h2 hides some: DATA on a reset stream)."""

    def __init__(self, preface: bool):
        self.frames: list[Frame] = []
        self._buf = bytearray()
        self._preface = preface  # a server first reads the client's connection preface

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self._preface:
            if len(self._buf) < len(PREFACE):
                return
            del self._buf[:len(PREFACE)]
            self._preface = False
        while len(self._buf) >= 9:
            frame, length = hyperframe.frame.Frame.parse_frame_header(
                memoryview(bytes(self._buf[:9])))
            if len(self._buf) < 9 + length:
                return
            kind = _FRAME_NAMES.get(self._buf[3], f"TYPE{self._buf[3]}")
            self.frames.append(Frame(kind, frame.stream_id, frozenset(frame.flags), length))
            del self._buf[:9 + length]

    def on(self, stream_id: int) -> list[Frame]:
        return [f for f in self.frames if f.stream_id == stream_id]


class H2Peer:
    """One side of an HTTP/2 connection in a test, driven with h2.

    settings: our SETTINGS (e.g. a small INITIAL_WINDOW_SIZE); auto_ack: acknowledge
    received DATA at once (off: the peer's window closes until `ack()`)."""

    def __init__(self, stream: Stream, client_side: bool,
                 settings: dict[int, int] | None = None, auto_ack: bool = True):
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None))
        if settings:
            self.conn.local_settings = h2.settings.Settings(
                client=client_side, initial_values=settings)
        self.auto_ack = auto_ack
        self.unacked: dict[int, int] = {}  # stream id -> flow-controlled bytes not acked
        self.received = 0  # DATA payload bytes, all streams
        self.sent = 0  # DATA payload bytes sent with send()
        self.streams: dict[int, H2Msg] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.eof = False
        self.log = FrameLog(preface=not client_side)
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.stream.write(data)
            except ConnectionError:
                pass  # the proxy closed this connection: nobody would read it

    def raw(self, data: bytes) -> None:
        """Bytes past h2 (a frame h2 would not send, or would stop its own side for),
        after what h2 has queued."""
        self.flush()
        self.stream.write(data)

    def get(self, sid: int, path: str, *extra: tuple[bytes, bytes]) -> None:
        """A GET on stream sid, ended with its headers (sent at the next flush)."""
        self.conn.send_headers(sid, h2_request("GET", path, *extra), end_stream=True)

    def answer(self, sid: int, body: bytes) -> None:
        """A whole 200 response with this body."""
        self.conn.send_headers(sid, ok(body))
        self.conn.send_data(sid, body, end_stream=True)
        self.flush()

    def msg(self, sid: int) -> H2Msg:
        return self.streams.setdefault(sid, H2Msg())

    def ended(self, *sids: int) -> bool:
        return all(sid in self.streams and self.streams[sid].ended for sid in sids)

    def done(self, sid: int) -> bool:
        """The stream is over: ended or reset."""
        m = self.streams.get(sid)
        return m is not None and (m.ended or m.reset is not None)

    async def step(self) -> None:
        """Receive one read's worth (and answer what h2 answers by itself)."""
        if self.eof:  # reads would return b"" at once: a loop waiting here would spin
            raise AssertionError("the connection closed first")
        data = await self.stream.read()
        if not data:
            self.eof = True
            return
        self.log.feed(data)
        for ev in self.conn.receive_data(data):
            self._on(ev)
        self.flush()

    async def until(self, cond: Callable[[], bool]) -> None:
        """Receive until cond() holds."""
        while not cond():
            await self.step()

    async def until_eof(self) -> None:
        while not self.eof:
            await self.step()

    async def send(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """Send a body as the windows allow, receiving while they are closed."""
        pos = 0
        while pos < len(data) or end_stream:
            n = min(self.conn.local_flow_control_window(sid), len(data) - pos,
                    self.conn.max_outbound_frame_size)
            if n <= 0 and pos < len(data):
                await self.step()
                continue
            last = end_stream and pos + n == len(data)
            self.conn.send_data(sid, data[pos:pos + n], end_stream=last)
            self.flush()
            pos += n
            self.sent += n
            if last:
                return

    def ack(self) -> None:
        """Acknowledge all DATA received so far (and from now on, as it comes)."""
        self.auto_ack = True
        for sid, n in self.unacked.items():
            if n:
                self.conn.acknowledge_received_data(n, sid)
        self.unacked.clear()
        self.flush()

    def _on(self, ev: Any) -> None:
        if isinstance(ev, (h2.events.RequestReceived, h2.events.ResponseReceived)):
            self.msg(ev.stream_id).headers = list(ev.headers)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self.msg(ev.stream_id).informational.append(list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            self.msg(ev.stream_id).body += ev.data
            self.received += len(ev.data)
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                self.unacked[ev.stream_id] = (self.unacked.get(ev.stream_id, 0)
                                              + ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.msg(ev.stream_id).trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.msg(ev.stream_id).ended = True
        elif isinstance(ev, h2.events.StreamReset):
            self.msg(ev.stream_id).reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def close(self) -> None:
        """GOAWAY, then close (as a client leaving politely)."""
        self.conn.close_connection()
        self.flush()
        self.stream.close()


def h2_request(method: str, path: str, *extra: tuple[bytes, bytes]) -> list:
    return [(b":method", method.encode()), (b":scheme", b"https"),
            (b":authority", b"example.test"), (b":path", path.encode()), *extra]


def ok(body: bytes = b"", *extra: tuple[bytes, bytes]) -> list:
    """A 200 response head with its content-length."""
    return [(b":status", b"200"), (b"content-length", str(len(body)).encode()), *extra]


async def h2_start(rig: Rig, tls: bool = False,
                   authority: bytes | None = None) -> tuple[MemStream, asyncio.Task]:
    """An H2Bridge on a client connection, towards example.test:443, its upstream plain
    (in memory) or, with tls, TLS with ALPN h2 as an intercepted tunnel has it (and as
    a fresh upstream connection after a GOAWAY needs it)."""
    ctx, client = rig.connect()
    up: Upstream = await ctx.open_upstream(
        "example.test", 443, ("example.test", ("h2",)) if tls else None)
    bridge = H2Bridge(ctx, ctx.stream, up, "https", "example.test", authority)
    rig.bridges.append(bridge)

    async def serve() -> None:
        try:
            await bridge.run()
        finally:
            ctx.close()  # as the tunnel does: the upstream goes with the bridge

    return client, asyncio.ensure_future(serve())


async def h2_client(rig: Rig, tls: bool = False, authority: bytes | None = None,
                    **peer: Any) -> tuple[H2Peer, asyncio.Task]:
    """h2_start, and the test's client on it (peer: H2Peer's options)."""
    client, serving = await h2_start(rig, tls, authority)
    return H2Peer(client, client_side=True, **peer), serving


def h2_origin(serve: Callable[[H2Peer], Awaitable[object]],
              tls: ssl.SSLContext | None = None, **peer: Any) -> Origin:
    """An HTTP/2 origin on each upstream connection (after TLS, with tls as the server's
    context): serve(peer), then read until the proxy leaves; returns the peer."""

    async def origin(stream: MemStream) -> H2Peer:
        conn: Stream = stream
        if tls is not None:
            conn = await TLSStream.handshake(stream, tls, server_side=True)
        o = H2Peer(conn, client_side=False, **peer)
        await serve(o)
        await o.until_eof()
        return o

    return origin
