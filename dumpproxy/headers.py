"""HTTP rules shared by the HTTP/1 and HTTP/2 bridges (pure): event header objects,
redaction, hop-by-hop filtering, message framing, reason phrases."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

# Hop-by-hop fields (RFC 9110 7.6.1) plus the proxy-only ones; never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Connection-specific fields may not appear in HTTP/2 (RFC 9113 8.2.2).
H2_FORBIDDEN = HOP_BY_HOP | {b"transfer-encoding", b"host"}
# Framing: a Connection header naming these must not make a body vanish.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# Schemes whose following word is kept when redacting (Authorization: Bearer <redacted>).
REDACTED = "<redacted>"


def text(value: bytes) -> str:
    """Header bytes as text: UTF-8 when valid, else Latin-1 (never fails)."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def redact(name: str, value: str) -> str:
    if name in ("authorization", "proxy-authorization"):
        scheme, sep, _ = value.strip().partition(" ")
        return f"{scheme} {REDACTED}" if sep else REDACTED
    return REDACTED


def header_object(items: Iterable[tuple[bytes, bytes]], redact_credentials: bool) -> dict:
    """Event `headers`: lower-case names, repeats joined (", " or "\\n" for set-cookie)."""
    out: dict[str, str] = {}
    for raw_name, raw_value in items:
        try:  # text() inlined for the common case: both UTF-8
            name = raw_name.decode().lower()
            value = raw_value.decode()
        except UnicodeDecodeError:
            name = text(raw_name).lower()
            value = text(raw_value)
        if redact_credentials and name in CREDENTIAL_HEADERS:
            value = redact(name, value)
        if name in out:
            out[name] += ("\n" if name == "set-cookie" else ", ") + value
        else:
            out[name] = value
    return out


Field = tuple[bytes, bytes, bytes]  # (name as received, lower-case name, value): h11's shape


def fields(items: Iterable[tuple[bytes, bytes]]) -> list[Field]:
    """(name, value) pairs as fields, each name lowered once."""
    return [(n, n.lower(), v) for n, v in items]


class Facts:
    """What the HTTP/1 bridge asks of one head's fields, found in a single pass: the first
    Transfer-Encoding, Content-Length and Upgrade values, whether Host is present, and the
    names and options listed in Connection."""

    __slots__ = ("transfer_encoding", "content_length", "upgrade", "host", "connection")

    def __init__(self, fields: Iterable[Field]):
        te = cl = upgrade = None
        host = False
        tokens: set[bytes] = set()
        for _, n, value in fields:
            if n in _NOTED:
                if n == b"transfer-encoding":
                    te = value if te is None else te
                elif n == b"content-length":
                    cl = value if cl is None else cl
                elif n == b"connection":
                    tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
                elif n == b"upgrade":
                    upgrade = value if upgrade is None else upgrade
                else:
                    host = True
        self.transfer_encoding: bytes | None = te
        self.content_length: bytes | None = cl
        self.upgrade: bytes | None = upgrade
        self.host = host
        self.connection = tokens

    @property
    def framing_conflict(self) -> bool:
        """Both Content-Length and Transfer-Encoding: a smuggling shape (SPEC §7)."""
        return self.transfer_encoding is not None and self.content_length is not None

    @property
    def wants_upgrade(self) -> bool:
        """An Upgrade field with `Connection: upgrade` (a WebSocket handshake, say)."""
        return self.upgrade is not None and b"upgrade" in self.connection


_NOTED = frozenset({b"transfer-encoding", b"content-length", b"connection", b"upgrade",
                    b"host"})


def connection_tokens(items: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Field names listed in Connection headers (also hop-by-hop for this message)."""
    return Facts(fields(items)).connection


def forwardable_fields(
    head: list[Field], keep_upgrade: bool = False, http2: bool = False,
    tokens: set[bytes] | None = None,
) -> list[Field]:
    """Fields to forward to the next hop: hop-by-hop and Connection-named fields removed
    (never the framing ones).

    With keep_upgrade, `Upgrade` and `Connection: upgrade` survive so that a WebSocket
    handshake reaches the origin. With http2, the fields HTTP/2 forbids go too, except
    `te: trailers`, which HTTP/2 allows (and gRPC needs). tokens: the Connection names,
    when the caller has them (`Facts.connection`).
    """
    if tokens is None:
        tokens = Facts(head).connection
    base = H2_FORBIDDEN if http2 else HOP_BY_HOP
    drop = base if not tokens or tokens <= base else base | (tokens - FRAMING)
    if keep_upgrade:
        drop = drop - {b"upgrade"}
    out = [f for f in head if f[1] not in drop
           or (http2 and f[0] == b"te" and f[2].strip().lower() == b"trailers")]
    if keep_upgrade:
        out.append((b"Connection", b"connection", b"upgrade"))
    return out


def forwardable(
    items: list[tuple[bytes, bytes]], keep_upgrade: bool = False, http2: bool = False,
) -> list[tuple[bytes, bytes]]:
    """`forwardable_fields` for (name, value) pairs."""
    return [(n, v) for n, _, v in forwardable_fields(fields(items), keep_upgrade, http2)]


def header_value(items: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of a (lower-case) header name."""
    for n, v in items:
        if n.lower() == name:
            return v
    return None


def has_token(items: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    for n, v in items:
        if n.lower() == name and token in (t.strip().lower() for t in v.split(b",")):
            return True
    return False


def body_length(method: str | bytes, status: int, items: list[tuple[bytes, bytes]],
                facts: Facts | None = None) -> int | None:
    """A response body's exact length when the head fixes it (0 for HEAD, 1xx, 204, 304;
    Content-Length otherwise), None when the body is chunked or runs to the close."""
    if method in ("HEAD", b"HEAD") or status < 200 or status in (204, 304):
        return 0
    if facts is None:
        facts = Facts(fields(items))
    if facts.transfer_encoding is not None:
        return None
    value = facts.content_length
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def reason_phrase(status: int) -> str:
    """The standard phrase for a status, "" for one without."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
