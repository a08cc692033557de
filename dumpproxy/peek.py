"""A client's first bytes, read and classified (`clienthello`), then left unread.

Deciding a tunnel needs its SNI or Host; terminating TLS to the proxy itself needs its
SNI and ALPN. Either way the bytes stay in the stream for TLS or the relay.
"""

from __future__ import annotations

import time

from dumpproxy.clienthello import Peek, classify
from dumpproxy.streams import Stream, StreamTimeout


async def peek_first_bytes(stream: Stream, deadline: float) -> tuple[bytes, Peek]:
    """A client's first bytes, until classify() is complete, EOF, an error or the deadline
    (time.monotonic()); they stay unread in the stream for TLS or the relay."""
    data = b""
    peek = classify(data)
    while not peek.complete:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            chunk = await stream.read(remaining)
        except (StreamTimeout, ConnectionError):
            break
        if not chunk:
            break
        data += chunk
        peek = classify(data)
    stream.unread(data)
    return data, peek


async def peek_client(stream: Stream, timeout: float) -> tuple[bytes, Peek]:
    """The client's first bytes within timeout; they stay unread in the stream."""
    return await peek_first_bytes(stream, time.monotonic() + timeout)
