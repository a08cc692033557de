"""Classify the first bytes a client sends inside a CONNECT tunnel.

Pure functions, no I/O: the caller passes everything received so far and calls
again with more bytes while ``complete`` is False.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Peek", "classify"]

_CAP = 64 * 1024  # give up waiting for more bytes beyond this
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_REQUEST = re.compile(rb"[A-Z-]{1,20} ")
_METHOD_PREFIX = re.compile(rb"[A-Z-]{1,20}")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_SPLIT = re.compile(rb"\r?\n")
_SNI_CHARS = re.compile(rb"[!-~]+")  # printable ASCII, no spaces or control bytes


@dataclass(frozen=True, slots=True)
class Peek:
    kind: str  # "tls", "http", "h2c", "other"
    complete: bool  # True when no more bytes are needed to decide
    sni: str | None = None  # TLS: server_name (lower-cased ascii), None if absent/invalid
    alpn: tuple[str, ...] = ()  # TLS: ALPN protocols offered, in order
    host: str | None = None  # http: Host header value (stripped), None if absent


_TLS_BAD = Peek("tls", True)  # decided: TLS-looking but unusable, no SNI/ALPN


def classify(data: bytes) -> Peek:
    """Classify the tunnel's first bytes; never raises on any input."""
    if not data:
        return Peek("other", False)
    if data[0] == 0x16:
        return _tls(data)
    if data.startswith(_PREFACE[:14]) or _PREFACE.startswith(data):
        # Still a prefix of the preface -> wait; full or diverged -> decided.
        return Peek("h2c", len(data) >= len(_PREFACE) or not _PREFACE.startswith(data))
    if _REQUEST.match(data):
        return _http(data)
    if _METHOD_PREFIX.fullmatch(data):
        return Peek("http", False)  # only part of a method token so far
    return Peek("other", True)


# --- TLS -------------------------------------------------------------------


def _tls(data: bytes) -> Peek:
    """Reassemble the first handshake message from records, then parse it."""
    view = memoryview(data)
    hs = bytearray()
    pos = 0
    while True:
        # Decide on the handshake header as soon as its bytes are visible.
        if hs and hs[0] != 1:  # not a ClientHello
            return _TLS_BAD
        if len(hs) >= 4:
            end = 4 + int.from_bytes(hs[1:4], "big")
            if end > _CAP:  # could never arrive within the cap
                return _TLS_BAD
            if len(hs) >= end:  # later records (CCS, early data) are not our business
                return _hello(bytes(hs[4:end]))
        if pos >= len(data):  # consumed everything, including a partial record
            return Peek("tls", len(data) > _CAP)
        header = view[pos : pos + 5]
        if header[0] != 22 or (len(header) > 1 and header[1] != 3):
            return _TLS_BAD
        if len(header) < 5:
            return Peek("tls", len(data) > _CAP)
        length = int.from_bytes(header[3:5], "big")
        if length == 0:  # RFC 8446 5.1: no zero-length handshake fragments
            return _TLS_BAD
        hs += view[pos + 5 : pos + 5 + length]
        pos += 5 + length


def _hello(body: bytes) -> Peek:
    try:
        sni, alpn = _parse_hello(body)
    except ValueError:
        return _TLS_BAD
    return Peek("tls", True, sni, alpn)


def _vec(buf: bytes, off: int, width: int, limit: int) -> tuple[int, int]:
    """Bounds of the length-prefixed vector at ``off``; ValueError if it overruns ``limit``."""
    start = off + width
    if start > limit:
        raise ValueError("truncated length")
    end = start + int.from_bytes(buf[off:start], "big")
    if end > limit:
        raise ValueError("vector overruns its container")
    return start, end


def _parse_hello(b: bytes) -> tuple[str | None, tuple[str, ...]]:
    n = len(b)
    off = 2 + 32  # legacy_version, random
    if off > n:
        raise ValueError("truncated ClientHello")
    for width in (1, 2, 1):  # session id, cipher suites, compression methods
        _, off = _vec(b, off, width, n)
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if off == n:  # the extensions block is optional
        return sni, alpn
    off, ext_end = _vec(b, off, 2, n)
    while off < ext_end:
        ext_type = int.from_bytes(b[off : off + 2], "big")
        start, end = _vec(b, off + 2, 2, ext_end)
        if ext_type == 0:
            sni = _sni(b, start, end)
        elif ext_type == 16:
            alpn = _alpn(b, start, end)
        off = end
    return sni, alpn


def _sni(b: bytes, start: int, end: int) -> str | None:
    off, list_end = _vec(b, start, 2, end)
    name: bytes | None = None
    while off < list_end:
        s, e = _vec(b, off + 1, 2, list_end)
        if b[off] == 0 and name is None:  # first host_name entry wins
            name = b[s:e]
        off = e
    if name is None:
        return None
    if not _SNI_CHARS.fullmatch(name):  # empty or non-ascii: a broken hello
        raise ValueError("invalid server_name")
    text = name.decode("ascii").lower()
    # A host name never has a port (RFC 6066 3), yet some clients send `name:port` (hey's
    # Go TLS config through a proxy): the name they mean is the part before it.
    host, colon, port = text.rpartition(":")
    if colon and host and port.isdigit() and ":" not in host:
        return host
    return text


def _alpn(b: bytes, start: int, end: int) -> tuple[str, ...]:
    off, list_end = _vec(b, start, 2, end)
    protos: list[str] = []
    while off < list_end:
        s, e = _vec(b, off, 1, list_end)
        if s == e:  # RFC 7301: protocol names are non-empty
            raise ValueError("empty ALPN protocol")
        protos.append(b[s:e].decode("latin-1"))  # opaque bytes: decode losslessly
        off = e
    return tuple(protos)


# --- HTTP/1 ----------------------------------------------------------------


def _http(data: bytes) -> Peek:
    end = _HEAD_END.search(data, 0, _CAP)  # bounded scan
    if end:
        head = data[: end.start()]
    elif len(data) > _CAP:
        # Oversized head: use the complete lines we have.
        head = data[: max(data.rfind(b"\n", 0, _CAP), 0)]
    else:
        return Peek("http", False)
    return Peek("http", True, host=_host(head))


def _host(head: bytes) -> str | None:
    for line in _LINE_SPLIT.split(head)[1:]:  # skip the request line
        name, colon, value = line.partition(b":")
        # The field name is exactly the token before ':'; " Host" / "Host " are not Host.
        if colon and name.lower() == b"host":
            return value.strip(b" \t").decode("latin-1")
    return None
