"""The socket stream's read timeouts (dumpproxy/streams.py) over a real TCP connection on
loopback: one timer per stream, armed for the earliest deadline and kept across reads,
must still time out each read at its own deadline, whatever came before it."""

from __future__ import annotations

import asyncio
import time

import pytest

from dumpproxy.streams import SocketStream, StreamTimeout


async def _pair() -> tuple[SocketStream, asyncio.StreamWriter, asyncio.AbstractServer]:
    """Our SocketStream connected to a peer we write through."""
    peers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def accepted(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await peers.put(w)

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(SocketStream, "127.0.0.1", port)
    return stream, await peers.get(), server


def test_each_read_times_out_at_its_own_deadline() -> None:
    async def main() -> None:
        stream, peer, server = await _pair()
        loop = asyncio.get_running_loop()
        # a long deadline armed the timer, then data came: the timer is still armed
        loop.call_later(0.05, peer.write, b"first")
        assert await stream.read(30) == b"first"
        # a shorter deadline than the armed one: it must fire at 0.2 s, not 30
        started = time.monotonic()
        with pytest.raises(StreamTimeout):
            await stream.read(0.2)
        assert 0.15 < time.monotonic() - started < 5
        # a timer armed for 0.3 s by a read that data ended early; the next read's
        # deadline is later: when the timer fires at 0.3 s it must wait on, not time out
        loop.call_later(0.05, peer.write, b"second")
        assert await stream.read(0.3) == b"second"
        loop.call_later(0.6, peer.write, b"third")
        assert await stream.read(1.5) == b"third"
        # no timeout at all: a wait past every armed deadline still succeeds
        loop.call_later(0.05, peer.write, b"fourth")
        assert await stream.read(0.2) == b"fourth"
        loop.call_later(0.4, peer.write, b"fifth")
        assert await stream.read(None) == b"fifth"
        stream.close()
        peer.close()
        server.close()

    asyncio.run(main())


def test_a_lost_connection_leaves_no_timer_holding_its_stream() -> None:
    async def main() -> None:
        stream, peer, server = await _pair()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, peer.write, b"x")
        assert await stream.read(600) == b"x"
        assert stream._timer is not None  # armed for 600 s, kept across reads
        peer.close()
        assert await stream.read(600) == b""  # EOF
        stream.close()
        for _ in range(50):
            if stream._timer is None:
                break
            await asyncio.sleep(0.01)
        assert stream._timer is None
        server.close()

    asyncio.run(main())
