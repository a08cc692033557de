"""In-memory byte streams for in-process bridge tests (no sockets, no threads).

`pipe()` makes a connected duplex pair of `MemStream`s. Each end implements dumpproxy's
`Stream` interface plus what a `SocketStream` also offers (`peername`, `bytes_in`,
`bytes_out`, `at_eof`), so it can stand in for a socket on either side of a bridge. The
semantics follow SocketStream over TCP:

- `read()` returns buffered chunks first, then b"" once the peer closed or half-closed;
  after the peer's `abort()` (a TCP reset) it raises ConnectionResetError instead.
- `write_eof()` is a half-close: the peer reads EOF, this end can still read.
- `close()` ends both directions; later writes and drains raise ConnectionResetError.
- Writes to a peer that closed its end are dropped (a socket accepts them into the
  kernel buffer; nobody ever reads them).
- No back-pressure: writes never block and `drain()` only reports a closed end.
- `ended` says how the connection ended, as SocketStream does (the first cause wins): the
  peer's close or half-close is "peer_closed", its abort "peer_reset", ours "proxy_closed".
"""

from __future__ import annotations

import asyncio
from collections import deque

from dumpproxy.streams import Stream, StreamTimeout


class MemStream(Stream):
    """One end of an in-memory connection."""

    def __init__(self, peername: tuple[str, int]):
        self.peername: tuple | None = peername  #: the other end's address, as a socket's
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer: MemStream  # set by pipe()
        self.closed = False  #: this end was closed or aborted
        self.aborted = False
        self.eof_sent = False  #: this end half-closed (write_eof)
        self._chunks: deque[bytes] = deque()
        self._eof = False  # nothing more will arrive
        self._exc: BaseException | None = None  # the reset a read reports after the data
        self._waiter: asyncio.Future | None = None
        self.ended: str | None = None  #: how the connection ended, as SocketStream says
        self.on_lost = None  #: as SocketStream's: told when the peer resets the connection

    def mark(self, how) -> None:  # type: ignore[override]
        if self.ended is None:
            self.ended = how

    async def linger_close(self, timeout: float = 0.0) -> None:
        self.mark("proxy_closed")
        self.close()

    # -- delivery from the peer --
    def _deliver(self, data: bytes) -> None:
        if self.closed or self._eof:
            return  # nobody will read it
        self.bytes_in += len(data)
        self._chunks.append(data)
        self._wake()

    def _end(self, exc: BaseException | None = None) -> None:
        """Nothing more arrives: the peer half-closed, closed or reset (or we closed)."""
        self.mark("peer_reset" if exc is not None else "peer_closed")  # as SocketStream
        self._eof = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- Stream interface --
    async def read(self, timeout: float | None = None) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._exc is not None:
                    raise ConnectionResetError(str(self._exc))
                return b""
            loop = asyncio.get_running_loop()
            self._waiter = fut = loop.create_future()
            timer = loop.call_later(timeout, _expire, fut) if timeout else None
            try:
                await fut
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._chunks.popleft()

    def unread(self, data: bytes) -> None:
        if data:
            self._chunks.appendleft(data)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def buffered(self) -> int:
        return sum(len(c) for c in self._chunks)

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("connection closed")
        if self.eof_sent:  # asyncio's transports refuse this too (RuntimeError)
            raise RuntimeError("write() after write_eof()")
        if data:
            self.bytes_out += len(data)
            self.peer._deliver(bytes(data))

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("connection lost")

    def write_eof(self) -> None:
        if self.closed or self.eof_sent:
            return
        self.eof_sent = True
        self.peer._end()

    def close(self) -> None:
        if self.closed:
            return
        self.mark("proxy_closed")
        self.closed = True
        self._end()  # our own reads end too (as after connection_lost)
        if not self.eof_sent:
            self.eof_sent = True
            self.peer._end()

    def abort(self) -> None:
        if self.closed:
            return
        self.mark("proxy_closed")
        self.closed = self.aborted = True
        self._end()
        self.peer._end(ConnectionResetError("connection reset by peer"))
        if self.peer.on_lost is not None:  # a reset is a lost connection, over there
            self.peer.on_lost()

    def interrupt(self, exc: BaseException) -> None:
        """As SocketStream's: a read waiting now raises exc."""
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    # -- for tests --
    async def read_all(self) -> tuple[bytes, bool]:
        """Everything until EOF, and whether the connection was reset instead of closed."""
        out = bytearray()
        try:
            while data := await self.read():
                out += data
        except ConnectionResetError:
            return bytes(out), True
        return bytes(out), False


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(StreamTimeout())


def pipe(left_addr: tuple[str, int], right_addr: tuple[str, int]) -> tuple[MemStream, MemStream]:
    """A connected pair of ends with these addresses (each end's peername is the other's)."""
    left, right = MemStream(right_addr), MemStream(left_addr)
    left.peer, right.peer = right, left
    return left, right
