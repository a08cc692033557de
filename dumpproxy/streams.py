"""Byte streams: a lean asyncio Protocol for sockets, and TLS over any stream via MemoryBIO.

Both sides of every relay and HTTP bridge see the same small interface (`Stream`), so a
bridge does not care whether it runs over TCP, TLS terminated by us, or TLS to the origin.
The socket stream hands out received chunks without copying them and supports `unread`,
which lets a tunnel peek at a ClientHello and still give those bytes to TLS or the relay.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Literal

from dumpproxy.schema import Ended, Tls

READ_SIZE = 256 * 1024
HIGH_WATER = 1024 * 1024  # pause reading from a socket whose data nobody consumes
TLS_READ_MAX = 256 * 1024  # gather decrypted records up to this much per read()
TLS_RECORD = 16384  # one record's plaintext at most: a read of this size never over-allocates
WRITE_HIGH_WATER = 512 * 1024
FLUSH_AT = 64 * 1024  # written bytes up to this wait for the end of the loop's step
LINGER = 2.0  # an orderly close waits this long for the peer's own close (no reset)


class StreamTimeout(Exception):
    """No data within the allowed time."""


class Stream:
    """Interface shared by SocketStream and TLSStream."""

    __slots__ = ()  # thousands of connections: no __dict__ per stream

    async def read(self, timeout: float | None = None) -> bytes:  # b"" at EOF
        raise NotImplementedError

    def unread(self, data: bytes) -> None:
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        self.close()

    def mark(self, how: Ended) -> None:
        """Record how the connection ends, unless an earlier cause is known."""


class SocketStream(asyncio.Protocol, Stream):
    __slots__ = ("_loop", "transport", "_chunks", "_buffered", "_eof", "_exc", "_read_waiter",
                 "_drain_waiters", "_write_paused", "_read_paused", "_lost", "peername",
                 "bytes_in", "bytes_out", "ended", "_wbuf", "_wsize", "on_lost", "_deadline",
                 "_timer")

    def __init__(self) -> None:
        # Asked once: on Python 3.11 every get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # A read's timeout: one timer per stream, armed for the earliest deadline and left
        # running across reads; a later read only moves `_deadline` (a timer per read
        # was a twentieth of a small exchange's cost). None: the waiting read has none.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        # received, not read yet: a list (few chunks at a time; a deque's first block is
        # 0.5 KB per connection)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiters: list[asyncio.Future] = []  # several tasks may wait at once
        self._write_paused = False
        self._read_paused = False
        self._lost = False
        self.peername: tuple | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.ended: Ended | None = None  # how the connection ended: the first cause wins
        # Writes made in one step of the loop go out in one send at its end: a response
        # head and its first body bytes, say (each send on loopback costs the receiver's work too).
        self._wbuf: list[bytes] = []
        self._wsize = 0  # bytes in _wbuf
        # told when the connection is lost (an exchange waiting on the other side of the
        # proxy learns at once that its client is gone)
        self.on_lost: Callable[[], None] | None = None

    def mark(self, how: Ended) -> None:
        """Record how the connection ends, unless an earlier cause is known."""
        if self.ended is None:
            self.ended = how

    # -- protocol callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # small writes must leave at once (not every loop sets this)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # Larger than asyncio's 64 KiB default: fewer pauses on bulk transfers, still bounded.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake_reader()

    def eof_received(self) -> bool:
        self.mark("peer_closed")
        self._eof = True
        self._wake_reader()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark("peer_reset" if exc is not None else "peer_closed")
        self._lost = True
        if self._timer is not None:  # (it holds this stream)
            self._timer.cancel()
            self._timer = None
        self._eof = True
        if exc is not None and self._exc is None:
            self._exc = exc
        self._wake_reader()
        for w in self._drain_waiters:
            if not w.done():
                w.set_exception(ConnectionResetError("connection lost"))
        self._drain_waiters.clear()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for w in self._drain_waiters:
            if not w.done():
                w.set_result(None)
        self._drain_waiters.clear()

    def _on_deadline(self) -> None:
        """The timer: a read still waiting past its deadline times out; one whose deadline
        moved on gets the timer again; none waiting leaves it unarmed."""
        self._timer = None
        w, deadline = self._read_waiter, self._deadline
        if w is None or w.done() or deadline is None:
            return
        if self._loop.time() >= deadline:
            w.set_exception(StreamTimeout())
        else:
            self._timer = self._loop.call_at(deadline, self._on_deadline)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- Stream interface --
    async def read(self, timeout: float | None = None) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._exc is not None:
                    raise ConnectionResetError(str(self._exc) or "connection reset")
                return b""
            loop = self._loop
            self._read_waiter = fut = loop.create_future()
            if timeout:
                self._deadline = deadline = loop.time() + timeout
                timer = self._timer
                if timer is None or timer.when() > deadline:
                    if timer is not None:
                        timer.cancel()
                    self._timer = loop.call_at(deadline, self._on_deadline)
            else:
                self._deadline = None
            try:
                await fut
            finally:
                self._read_waiter = None
        data = self._chunks.pop(0)
        self._buffered -= len(data)
        if self._read_paused and self._buffered < HIGH_WATER // 4:
            self._read_paused = False
            if not self._lost:
                self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def interrupt(self, exc: BaseException) -> None:
        """A read waiting now raises exc (what it waited for no longer matters)."""
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return self._buffered

    def unread(self, data: bytes) -> None:
        if data:
            self._chunks.insert(0, data)
            self._buffered += len(data)

    def write(self, data: bytes) -> None:
        if self._lost or self.transport.is_closing():  # type: ignore[union-attr]
            raise ConnectionResetError("connection closed")
        self.bytes_out += len(data)
        if not self._wbuf:
            self._loop.call_soon(self.flush)
        self._wbuf.append(data)
        self._wsize += len(data)
        if self._wsize >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Send what was written (it goes by itself at the end of the loop's step)."""
        buf = self._wbuf
        if not buf:
            return
        self._wbuf = []
        self._wsize = 0
        t = self.transport
        if t is not None and not self._lost and not t.is_closing():
            t.write(buf[0] if len(buf) == 1 else b"".join(buf))

    async def drain(self) -> None:
        # Small writes stay buffered until the end of this step of the loop, where what
        # else was written joins them (a response and the close_notify after it, say).
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut

    def write_eof(self) -> None:
        self.flush()
        t = self.transport
        if t is not None and not self._lost and not t.is_closing() and t.can_write_eof():
            try:
                t.write_eof()
            except OSError:  # peer already reset (ENOTCONN): nothing left to half-close
                pass

    def close(self) -> None:
        self.mark("proxy_closed")
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.mark("proxy_closed")
        self._wbuf = []
        self._wsize = 0
        if self.transport is not None:
            self.transport.abort()

    async def linger_close(self, timeout: float = LINGER) -> None:
        """Close without a reset: send FIN, read (and drop) until the peer's FIN or the
        timeout, then close. Data arriving after close(2) makes the kernel answer with a
        reset, which a client that is closing normally (Node's http2 client sends GOAWAY,
        close_notify and FIN) reports as ECONNRESET."""
        t = self.transport
        if t is None or self._lost or t.is_closing():
            self.close()
            return
        self.mark("proxy_closed")
        self.write_eof()
        deadline = self._loop.time() + timeout
        try:
            while not self._eof:
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    break
                self._chunks.clear()
                self._buffered = 0
                if self._read_paused:
                    self._read_paused = False
                    t.resume_reading()
                await self.read(remaining)
        except (StreamTimeout, ConnectionError, OSError):
            pass
        finally:
            self.close()


class TLSStream(Stream):
    """TLS over another Stream, driven through ssl.MemoryBIO (works with peeked bytes)."""

    __slots__ = ("inner", "ssl", "_in", "_out", "_closed_tls", "_read_closed", "_hold_out",
                 "_pending", "bytes_in")

    def __init__(self, inner: Stream, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.inner = inner
        self.ssl = sslobj
        self._in = incoming
        self._out = outgoing
        self._closed_tls = False
        self._read_closed = False  # the peer's close_notify (or EOF) was read
        self._hold_out = False  # what TLS writes unasked waits for our next write
        self._pending: list[bytes] = []  # unread plaintext (see SocketStream._chunks)
        self.bytes_in = 0  # plaintext received (the peer's application data)

    @classmethod
    async def handshake(cls, inner: Stream, ctx: ssl.SSLContext, server_side: bool,
                        server_hostname: str | None = None,
                        timeout: float | None = None) -> TLSStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname)
        self = cls(inner, obj, incoming, outgoing)
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await inner.read(timeout)
                if not data:
                    incoming.write_eof()
                else:
                    incoming.write(data)
            except ssl.SSLError:
                await self._flush_quietly()  # let the peer see our alert
                raise
        # A TLS 1.3 server's last words in the handshake are session tickets, which no
        # client waits for: when the client's first bytes came with its Finished, they
        # leave with the first response (one send, not two). Otherwise they leave now: a
        # client with Nagle's algorithm on (no TCP_NODELAY: Java's and Python's plain
        # sockets) holds its request until its Finished is acknowledged, and an ACK with
        # no data to ride on is delayed up to 40 ms. Nothing else a TLS 1.3 server writes
        # unasked is awaited (no renegotiation; a key update's answer is not).
        self._hold_out = (server_side and obj.version() == "TLSv1.3"
                          and bool(incoming.pending or inner.buffered))
        if not self._hold_out:
            await self._flush()
        return self

    async def _flush(self) -> None:
        out = self._out.read()
        if out:
            self.inner.write(out)
            await self.inner.drain()

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (OSError, ConnectionError):
            pass

    async def read(self, timeout: float | None = None) -> bytes:
        if self._pending:
            return self._pending.pop(0)
        parts: list[bytes] = []
        size = 0
        sslobj, incoming = self.ssl, self._in
        while True:
            if not (incoming.pending or incoming.eof or sslobj.pending() or self._read_closed):
                # Nothing left to decrypt: a read would only raise SSLWantReadError (an
                # exception per call costs more than the record itself).
                if parts:
                    break
                await self._receive(timeout)
                continue
            try:
                data = sslobj.read(TLS_RECORD)
            except ssl.SSLWantReadError:  # a partial record, or a handshake message
                if parts:
                    break
                await self._receive(timeout)
                continue
            except ssl.SSLZeroReturnError:  # close_notify: an orderly close
                self._read_closed = True
                self.mark("peer_closed")
                data = b""
            except ssl.SSLEOFError:
                self._read_closed = True
                data = b""
            except ssl.SSLError as e:  # a broken record or a fatal alert: the peer's fault
                raise ConnectionResetError(f"TLS error: {e.reason or e}") from None
            if not data:
                break
            parts.append(data)
            size += len(data)
            if size >= TLS_READ_MAX:
                break
        if not parts:
            return b""
        self.bytes_in += size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _receive(self, timeout: float | None) -> None:
        """More records from below (after sending what TLS has to say, e.g. a key update's
        answer); the peer's EOF is given to TLS."""
        if not self._hold_out:
            out = self._out.read()
            if out:
                self.inner.write(out)
        chunk = await self.inner.read(timeout)
        if chunk:
            self._in.write(chunk)
        else:
            self._in.write_eof()

    def unread(self, data: bytes) -> None:
        if data:
            self._pending.insert(0, data)

    @property
    def buffered(self) -> bool:
        """Received and not read yet: plaintext, or records not decrypted."""
        return bool(self._pending) or self._in.pending > 0

    def write(self, data: bytes) -> None:
        if self._closed_tls:
            raise ConnectionResetError("TLS session closed")
        try:
            self.ssl.write(data)
        except ssl.SSLError as e:
            raise ConnectionResetError(f"TLS error: {e.reason or e}") from None
        self.inner.write(self._out.read())

    async def drain(self) -> None:
        await self.inner.drain()

    def write_eof(self) -> None:
        # TLS has no half-close of its own: send close_notify, then FIN.
        if self._closed_tls:
            return
        self._closed_tls = True
        try:
            self.ssl.unwrap()
        except ssl.SSLError:
            pass
        out = self._out.read()
        try:
            if out:
                self.inner.write(out)
            self.inner.write_eof()
        except ConnectionError:
            pass

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

    @property
    def ended(self) -> Ended | None:
        """How the connection under the TLS ended (TLS over TLS: the outermost says)."""
        return getattr(self.inner, "ended", None)

    async def linger_close(self, timeout: float = LINGER) -> None:
        """close_notify (unless the peer reset), then the socket's orderly close."""
        if self.ended != "peer_reset":
            self.write_eof()
        linger = getattr(self.inner, "linger_close", None)
        if linger is not None:
            await linger(timeout)
        else:
            self.inner.close()

    def mark(self, how: Ended) -> None:
        self.inner.mark(how)

    def event(self, side: Literal["client", "server"], address: str, sni: str | None) -> Tls:
        """The `tls` event's fields for this completed handshake (both sides use this)."""
        cipher = self.ssl.cipher()
        return Tls(side=side, address=address, sni=sni,
                   alpn=self.ssl.selected_alpn_protocol(), version=self.ssl.version(),
                   cipher=cipher[0] if cipher else None)
