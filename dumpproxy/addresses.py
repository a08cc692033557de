"""Address syntax (pure): `host:port` with IPv6 brackets, and telling IP literals apart."""

from __future__ import annotations

import ipaddress


def strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join_host_port(host: str, port: int) -> str:
    """`example.com:443`, `[2001:db8::1]:443` (SPEC §2: IPv6 bracketed)."""
    host = strip_brackets(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False
