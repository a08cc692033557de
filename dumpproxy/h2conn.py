"""HTTP/2 connections as the bridge uses them: h2's state machine with our settings, patched
where h2's own choice would cost the bridge, and guarded against garbage frame headers.

Every use of h2's and hpack's private API is in this module, so that an upgrade of
either breaks here and nowhere else:
- a graceful GOAWAY (NO_ERROR) received leaves the connection open (h2 closes it, and the
  frames of the streams the peer still finishes become protocol errors);
- a client stream over our MAX_CONCURRENT_STREAMS is refused on its own with
  REFUSED_STREAM (RFC 9113 5.1.2; h2 makes it a connection error, losing the legal
  requests that came in the same read);
- a frame header announcing more than the maximum frame size is refused at once (h2
  waits until the whole frame is buffered);
- DATA frames are not hex-dumped for a debug string nobody reads;
- HPACK does not ask the logging module, some 70 times per exchange, whether its debug
  lines (never shown) are wanted;
- HPACK's Huffman decoder (Python, a step per input byte) remembers the short strings it
  decoded: an origin sends the same Huffman-coded values (server, content-type, etag...)
  in every response, and its decoder was the costliest function of an HTTP/2 exchange.

What the bridge sends on is marked for HPACK here too (`never_indexed`): h2's outbound
normalisation, which would mark credentials, is off (see `new_connection`).
"""

from __future__ import annotations

from functools import lru_cache

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack.hpack
import hpack.table
import hyperframe.frame
from h2.connection import _decode_headers  # the HPACK step h2 itself uses
from h2.stream import StreamClosedBy
from hpack import NeverIndexedHeaderTuple

STREAM_WINDOW = 1024 * 1024  # per-stream receive window we grant
CONNECTION_WINDOW = 4 * 1024 * 1024  # and per connection: the most we ever buffer
MAX_STREAMS = 128

# h2 formats repr(frame) for every frame it receives, even with logging off
# (H2Connection._receive_frame); for DATA that serializes and hex-encodes the whole
# payload. A summary keeps that cost independent of the payload size.
hyperframe.frame.DataFrame._body_repr = lambda self: f"<{len(self.data)} bytes>"  # type: ignore


def _no_debug(*args, **kwargs) -> None:
    """hpack's debug lines (some 70 per exchange, never shown), skipped at once instead of
    going through the logging module's level checks."""


hpack.hpack.log.debug = _no_debug  # type: ignore[method-assign]
hpack.table.log.debug = _no_debug  # type: ignore[method-assign]

HUFFMAN_CACHED = 128  # bytes: longer strings are decoded each time (at most ~200 KB kept)
_decode_huffman = hpack.hpack.decode_huffman
_decode_huffman_cached = lru_cache(maxsize=512)(_decode_huffman)  # a pure function


def decode_huffman(data: bytes) -> bytes:
    """hpack's decode_huffman, remembered for short strings (an error is never cached)."""
    if len(data) <= HUFFMAN_CACHED and type(data) is bytes:
        return _decode_huffman_cached(data)
    return _decode_huffman(data)


hpack.hpack.decode_huffman = decode_huffman


CREDENTIALS = frozenset({b"authorization", b"proxy-authorization"})


def never_indexed(received: list, out: list[tuple[bytes, bytes]]) -> list:
    """out's fields as HPACK must send them on: never indexed where the sender marked them
    so (RFC 7541 7.1.3: an intermediary keeps that representation) and, as h2's own
    outbound normalisation would, for credentials and cookies under 20 bytes (a
    compression context must not let a guessed secret be checked: CRIME)."""
    kept = {(h[0], h[1]) for h in received if type(h) is NeverIndexedHeaderTuple}
    return [NeverIndexedHeaderTuple(n, v)
            if n in CREDENTIALS or (n == b"cookie" and len(v) < 20) or (kept and (n, v) in kept)
            else (n, v) for n, v in out]


class Connection(h2.connection.H2Connection):
    """h2 closes its state machine on any GOAWAY received, after which the frames of the
    streams the peer still finishes are protocol errors. A graceful GOAWAY (NO_ERROR)
    leaves the connection open here; the bridge opens no new stream on it."""

    # How many closed streams h2 remembers (how each closed), oldest forgotten first. h2's
    # 2**16 costs ~135 bytes per finished stream on each connection of a pair, ~17 MB per
    # long-lived pair. The record is needed only for a frame the peer sent before it saw
    # our RST_STREAM (else it is a connection error; RFC 9113 5.1 lets that period be
    # limited). Only streams open at that moment can close while such a frame is on its
    # way: at most MAX_STREAMS on the client's connection, and as many upstream (one per
    # client stream). Four times that leaves room; ~70 KB per connection at most.
    MAX_CLOSED_STREAMS = 4 * MAX_STREAMS

    def _receive_goaway_frame(self, frame):
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = h2.errors.ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]

    @property
    def closed(self) -> bool:
        """GOAWAY sent or a fatal error: nothing more is received or sent."""
        return self.state_machine.state is h2.connection.ConnectionState.CLOSED

    def receive(self, data: bytes) -> list:
        """h2's events for these bytes; a frame header over the size limit is refused at
        once (RFC 9113 4.2: FRAME_SIZE_ERROR) instead of waiting for megabytes."""
        events = self.receive_data(data)
        buf = self.incoming_buffer
        pending = getattr(buf, "_data", None)
        if pending is None:
            pending = getattr(buf, "data", b"")
        if len(pending) >= 3:
            length = int.from_bytes(pending[:3], "big")
            if length > self.max_inbound_frame_size:
                self.close_connection(error_code=h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {length} bytes, more than the maximum "
                    f"{self.max_inbound_frame_size}")
        return events


class ClientFacing(Connection):
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


def new_connection(client_side: bool) -> Connection:
    """A connection with our settings, its preface and window update queued: towards an
    origin (client_side) or facing a client."""
    # What the bridge sends was read (and validated, and normalised) by h2 on the other
    # side, or is a literal of ours: checking it again on the way out is double work
    # (some 30 % of an HTTP/2 exchange's cost). Inbound checks stay on.
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                       validate_inbound_headers=True,
                                       normalize_inbound_headers=True,
                                       validate_outbound_headers=False,
                                       normalize_outbound_headers=False)
    conn = (Connection if client_side else ClientFacing)(config=config)
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    return conn


def refusal(error_code: h2.errors.ErrorCodes, reason: str) -> bytes:
    """What a server says to an HTTP/2 client it will not serve: its SETTINGS, then GOAWAY
    with the code and the reason as debug data."""
    settings = hyperframe.frame.SettingsFrame(0)
    goaway = hyperframe.frame.GoAwayFrame(0)
    goaway.error_code = error_code
    goaway.additional_data = reason.encode()[:1024]
    return settings.serialize() + goaway.serialize()


def goaway(last_stream_id: int) -> bytes:
    """A graceful GOAWAY (NO_ERROR) as bytes, outside h2's state machine: the peer opens no
    new stream, and the streams up to last_stream_id still finish (h2 would refuse their
    frames after a GOAWAY of its own)."""
    frame = hyperframe.frame.GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    return frame.serialize()
