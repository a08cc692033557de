"""SOCKS5 on the wire (pure): RFC 1928 greeting and request, RFC 1929 user/pass, replies.

Every parser takes all bytes received so far and returns None while more are needed,
or the parsed value and how many bytes it used; malformed input raises `SocksError`
carrying the reply code to answer with (None: the peer does not speak SOCKS5, close).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 subnegotiation

NO_AUTH = 0x00
USER_PASS = 0x02
NO_ACCEPTABLE = 0xFF

CONNECT, BIND, UDP_ASSOCIATE = 1, 2, 3

ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

# RFC 1928 6. Replies
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

REPLY_TEXT = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

COMMAND_NAMES = {CONNECT: "CONNECT", BIND: "BIND", UDP_ASSOCIATE: "UDP ASSOCIATE"}


class SocksError(Exception):
    """Malformed or unsupported input. reply: the code to answer a request with, or None
    when no reply fits (not SOCKS5 at all: close the connection)."""

    def __init__(self, message: str, reply: int | None = GENERAL_FAILURE):
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Request:
    command: int  # CONNECT, BIND, UDP_ASSOCIATE, or another byte
    host: str  # an IP address (no brackets) or a domain name
    port: int
    atyp: int


def parse_greeting(buf: bytes) -> tuple[tuple[int, ...], int] | None:
    """VER NMETHODS METHODS -> (methods offered, bytes used)."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise SocksError(f"not a SOCKS5 greeting (version byte {buf[0]:#04x})", None)
    if len(buf) < 2:
        return None
    n = buf[1]
    if n == 0:
        raise SocksError("SOCKS5 greeting offers no authentication method", None)
    if len(buf) < 2 + n:
        return None
    return tuple(buf[2:2 + n]), 2 + n


def choose_method(methods: tuple[int, ...], need_auth: bool) -> int:
    """The method to select: user/pass when credentials are required, else no-auth."""
    wanted = USER_PASS if need_auth else NO_AUTH
    return wanted if wanted in methods else NO_ACCEPTABLE


def method_reply(method: int) -> bytes:
    return bytes((VERSION, method))


def parse_user_pass(buf: bytes) -> tuple[bytes, bytes, int] | None:
    """RFC 1929: VER ULEN UNAME PLEN PASSWD -> (user, password, bytes used)."""
    if not buf:
        return None
    if buf[0] != AUTH_VERSION:
        raise SocksError(f"bad username/password version {buf[0]:#04x}", None)
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end]), end


def auth_reply(ok: bool) -> bytes:
    return bytes((AUTH_VERSION, 0 if ok else 1))


def parse_request(buf: bytes) -> tuple[Request, int] | None:
    """VER CMD RSV ATYP DST.ADDR DST.PORT -> (request, bytes used)."""
    if len(buf) < 4:
        if buf and buf[0] != VERSION:
            raise SocksError(f"bad SOCKS5 request version {buf[0]:#04x}")
        return None
    ver, cmd, _rsv, atyp = buf[0], buf[1], buf[2], buf[3]
    if ver != VERSION:
        raise SocksError(f"bad SOCKS5 request version {ver:#04x}")
    if atyp == ATYP_IPV4:
        end = 4 + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[4:end])))
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[4:end])))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 5:
            return None
        n = buf[4]
        end = 5 + n
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[5:end])
        if not n or not _valid_name(raw):
            raise SocksError(f"bad domain name {raw!r} in SOCKS5 request", HOST_UNREACHABLE)
        host = raw.decode("ascii")
    else:
        raise SocksError(f"SOCKS5 address type {atyp:#04x} not supported",
                         ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = struct.unpack("!H", bytes(buf[end:end + 2]))
    return Request(cmd, host, port, atyp), end + 2


def _valid_name(raw: bytes) -> bool:
    """A host name we may look up: printable ASCII without spaces, '/', '@' or ':'."""
    return all(0x21 <= b <= 0x7E and b not in b"/@:[]\\" for b in raw)


def reply(code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT (the bound address is an IP, else 0.0.0.0:0)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip, port = ipaddress.IPv4Address(0), 0
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + ip.packed + struct.pack("!H", port)


def encode_request(command: int, host: str, port: int) -> bytes:
    """A client's request (for tests and tools): IP literals as such, else a domain name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        addr = bytes((ATYP_DOMAIN, len(name))) + name
    else:
        addr = bytes((ATYP_IPV4 if ip.version == 4 else ATYP_IPV6,)) + ip.packed
    return bytes((VERSION, command, 0)) + addr + struct.pack("!H", port)
