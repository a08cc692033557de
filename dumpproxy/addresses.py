"""Address syntax (pure): `host:port` with IPv6 brackets, and telling IP literals apart."""

from __future__ import annotations

import functools
import ipaddress

DEFAULT_PORTS = {"http": 80, "https": 443}


def strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join_host_port(host: str, port: int) -> str:
    """`example.com:443`, `[2001:db8::1]:443` (SPEC §2: IPv6 bracketed)."""
    host = strip_brackets(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def authority(scheme: str, host: str, port: int) -> str:
    """A URL's authority: the port left out when it is the scheme's default."""
    if DEFAULT_PORTS.get(scheme) == port:
        host = strip_brackets(host)
        return f"[{host}]" if ":" in host else host
    return join_host_port(host, port)


def split_host_port(target: str, default_port: int | None = None) -> tuple[str, int]:
    """`example.com:443`, `[::1]:443` -> (host, port) with brackets removed.

    Raises ValueError for a missing or bad port (unless default_port) or empty host.
    """
    target = target.strip()
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {target!r}")
        host, rest = target[1:end], target[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after ']' in {target!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            host, port_text = target, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{target!r} has no port (expected HOST:PORT)")
        port = default_port
    else:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in {target!r}")
        port = int(port_text)
    if not host:
        raise ValueError(f"{target!r} has no host")
    return host, port


@functools.lru_cache(maxsize=4096)
def is_ip(name: str) -> bool:
    """An IP literal (a cache: every request's host is asked, and a name costs ipaddress
    two failed parses)."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class BadHost(ValueError):
    """A host name from the wire that no connection could be made to; says why."""


# Printable ASCII less what cannot appear in a host name (space, '/', '@', brackets, ...).
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_host(host: str) -> str:
    """The one check every host name from the wire goes through (CONNECT target, absolute
    URL, Host header, SNI): an IP literal or a DNS name that resolvers, IDNA and
    certificates accept. Returns the host; raises BadHost naming the problem."""
    if is_ip(host):
        return host
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise BadHost("invalid host name: empty")
    if len(name) > 253:
        raise BadHost("invalid host name: longer than 253 characters")
    for label in name.split("."):
        if not label:
            raise BadHost(f"invalid host name {_show(host)}: empty label")
        if len(label) > 63:
            raise BadHost(f"invalid host name {_show(host)}: label longer than 63 characters")
    if name.isascii():
        bad = next((c for c in name if c not in _HOST_CHARS), None)
        if bad is not None:
            raise BadHost(f"invalid host name {_show(host)}: character {bad!r}")
        return host
    try:  # an internationalized name must have an ASCII (punycode) form
        check_host(name.encode("idna").decode("ascii"))
    except (UnicodeError, BadHost):
        raise BadHost(f"invalid host name {_show(host)}: not a valid "
                      "internationalized name") from None
    return host


def _show(host: str) -> str:
    if "@" in host:  # userinfo (user:password@) is never echoed into events
        host = "<redacted>@" + host.rpartition("@")[2]
    return repr(host if len(host) <= 80 else host[:77] + "...")
