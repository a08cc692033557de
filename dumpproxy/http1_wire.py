"""HTTP/1 on the wire: the one place where an HTTP/1 parser is used (h11).

Everything above speaks in the events named here (h11's shapes: `Request`, `Response`,
`InformationalResponse`, `Data`, `EndOfMessage`, `ConnectionClosed`) and drives a
connection only through `Wire`'s methods: parsing, encoding, and the few questions about
its state a bridge asks (may an answer still be sent, has a new head begun, can the
connection carry another exchange). A second parser that yields the same events plugs in
here, without touching the bridges.
"""

from __future__ import annotations

import re
import time
from typing import Literal

import h11

from dumpproxy import headers as hdr
from dumpproxy.streams import Stream, StreamTimeout

MAX_HEAD = 64 * 1024  # request or response head, bytes

# The events (h11's classes: the seam's vocabulary).
Request = h11.Request
Response = h11.Response
InformationalResponse = h11.InformationalResponse
Data = h11.Data
EndOfMessage = h11.EndOfMessage
ConnectionClosed = h11.ConnectionClosed
Event = h11.Event
# The failures: the peer broke the protocol (Remote), or we were about to (Local).
ProtocolError = h11.ProtocolError
RemoteProtocolError = h11.RemoteProtocolError
LocalProtocolError = h11.LocalProtocolError
NEED_DATA = h11.NEED_DATA


def request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """A request head whose fields came out of a parser (already validated): h11's
    per-field regexes, the largest cost of a small exchange, are skipped."""
    return h11.Request(method=method, target=target, headers=headers, _parsed=True)


def response(status: int, headers: list[tuple[bytes, bytes]], reason: bytes) -> h11.Response:
    """A response head from already-parsed fields (see `request`)."""
    return h11.Response(status_code=status, headers=headers, reason=reason, _parsed=True)


class Wire:
    """One HTTP/1 connection's protocol state, as client or server."""

    __slots__ = ("_h", "role")

    def __init__(self, role: Literal["client", "server"], max_head: int = MAX_HEAD):
        self.role = role
        self._h = h11.Connection(h11.CLIENT if role == "client" else h11.SERVER,
                                 max_incomplete_event_size=max_head)

    # -- parsing --
    def next_event(self):
        """The next event parsed from what was received, or NEED_DATA."""
        return self._h.next_event()

    def receive(self, data: bytes) -> None:
        """Feed received bytes; b"" is the peer's EOF."""
        self._h.receive_data(data)

    async def read_event(self, stream: Stream, timeout: float | None):
        """The next event, reading from the stream as needed (EOF is fed as b"").

        The timeout bounds the whole event (a head trickled a byte at a time included),
        not each read."""
        h = self._h
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ev = h.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise StreamTimeout()
            h.receive_data(await stream.read(remaining))

    @property
    def trailing(self) -> bytes:
        """Received bytes not parsed yet (what follows the last event)."""
        return bytes(self._h.trailing_data[0])

    # -- encoding --
    def send(self, stream: Stream, event) -> None:
        data = self._h.send(event)
        if data:
            stream.write(data)

    def send_body(self, stream: Stream, data: bytes) -> None:
        """Body bytes, framed as the head announced, written without copying them."""
        for piece in self._h.send_with_data_passthrough(h11.Data(data=data)):  # type: ignore
            stream.write(piece)

    # -- state --
    @property
    def can_answer(self) -> bool:
        """No response head has gone out yet: an answer of our own can still be sent."""
        return self._h.our_state in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def idle(self) -> bool:
        """Between exchanges: no message under way either way, nothing unparsed."""
        h = self._h
        return (h.our_state is h11.IDLE and h.their_state is h11.IDLE
                and not h.trailing_data[0])

    @property
    def head_started(self) -> bool:
        """The peer began a message (some of its bytes arrived) that is not complete."""
        return self._h.their_state is not h11.IDLE or bool(self._h.trailing_data[0])

    def next_cycle(self) -> bool:
        """Both messages of the exchange are complete: ready the connection for the next
        one. False when it cannot carry another (closing, or a message unfinished)."""
        h = self._h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            return True
        return False


def error_response(status: int, message: str, extra: tuple = ()) -> list:
    """The events of a short text/plain answer made by dumpproxy itself."""
    body = (message.rstrip("\n") + "\n").encode()
    head = h11.Response(
        status_code=status,
        reason=hdr.reason_phrase(status).encode(),
        headers=[
            *extra,
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    )
    return [head, h11.Data(data=body), h11.EndOfMessage()]


def answer_error(wire: Wire, client: Stream, status: int, message: str,
                 extra: tuple = ()) -> bool:
    """Best effort error answer (the connection is closed after it); False when it could
    not be sent (the client is gone, or a response head went out already)."""
    if not wire.can_answer:
        return False
    try:
        for event in error_response(status, message, extra):
            wire.send(client, event)
    except (h11.LocalProtocolError, ConnectionError):
        return False
    return True


def protocol_error_text(e: h11.ProtocolError, redact: bool) -> str:
    """The parser's message, whose quoted raw line may carry credentials (a malformed
    `Authorization` line): withheld unless --no-redact; a bytearray repr made readable."""
    text = str(e)
    if redact:
        cut = re.search(r": (bytearray\()?b['\"]", text)
        if cut:
            return text[: cut.start()] + " (raw bytes withheld; --no-redact shows them)"
        return text
    return re.sub(r"bytearray\((b'.*?')\)", r"\1", text)


def status_hint(e: h11.ProtocolError) -> int:
    """The status a malformed request is answered with (400, 431 for a head too large)."""
    return e.error_status_hint or 400
