"""Idle upstream connections, kept for the next exchange to the same destination from any
client connection (SPEC §9.2): no new TCP connection and TLS handshake for it, and no new
`server_connect`.

A connection is kept only when its user released it able to carry another exchange (an
HTTP/1 connection between exchanges, both sides done, keep-alive) and it is healthy: not
closed by the origin, nothing unread on it. It is keyed by everything that makes two
connections interchangeable: how it was made (the mode's connector: direct, through an
upstream proxy), host and port, the TLS server name and ALPN offer (verification settings
belong to the connector), and whether it carries absolute-form plain HTTP to an upstream
proxy. Bounded per key and in all; each waits at most IDLE seconds. HTTP/2 connections are
not kept (a bridge owns them for its client's whole connection).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from dumpproxy.upstream import Connector, TLSRequest, Upstream

PER_KEY = 8  # idle connections kept for one destination
TOTAL = 256  # and in all
IDLE = 15.0  # seconds an idle connection is kept (--pool-idle-timeout; origins close
# theirs after 60-75 s)

Key = tuple[int, str, int, "TLSRequest | None", bool]


def pool_key(connector: Connector, host: str, port: int, tls: TLSRequest | None,
             forward: bool) -> Key:
    return (id(connector), host.lower(), port, tls, forward)


class Pool:
    """The idle connections of a run, in `context.Services`."""

    def __init__(self, per_key: int = PER_KEY, total: int = TOTAL, idle: float = IDLE):
        self.per_key = per_key
        self.total = total
        self.idle = idle
        # every idle connection, least recently released first, with its key and timer
        self._idle: OrderedDict[Upstream, tuple[Key, asyncio.TimerHandle]] = OrderedDict()
        self._by_key: dict[Key, list[Upstream]] = {}  # most recently released last

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, key: Key) -> Upstream | None:
        """A healthy idle connection for this key (the most recent), or None."""
        stack = self._by_key.get(key)
        while stack:
            up = stack.pop()
            _, timer = self._idle.pop(up)
            timer.cancel()
            if not stack:
                del self._by_key[key]
            if up.healthy:
                return up
            up.close()  # the origin closed it while idle: never handed out
        return None

    def address_of(self, connector: Connector, host: str, port: int) -> str | None:
        """The resolved address of an idle connection to host:port made by this connector,
        if there is one (a tunnel may then wait to connect until its client's first bytes
        say which connection it needs)."""
        wanted = (id(connector), host.lower(), port)
        for key, stack in self._by_key.items():
            if key[:3] == wanted and stack:
                return stack[-1].ip_host
        return None

    def put(self, up: Upstream, key: Key) -> bool:
        """Keep a released connection; False when it cannot be kept (closed by the caller)."""
        if not up.healthy or self.total <= 0 or self.per_key <= 0 or self.idle <= 0:
            return False
        stack = self._by_key.setdefault(key, [])
        if len(stack) >= self.per_key:
            self._drop(stack[0])
        while len(self._idle) >= self.total:
            self._drop(next(iter(self._idle)))
        timer = asyncio.get_running_loop().call_later(self.idle, self._expire, up)
        self._idle[up] = (key, timer)
        self._by_key.setdefault(key, stack).append(up)
        return True

    def _drop(self, up: Upstream) -> None:
        key, timer = self._idle.pop(up)
        timer.cancel()
        stack = self._by_key[key]
        stack.remove(up)
        if not stack:
            del self._by_key[key]
        up.close()

    def _expire(self, up: Upstream) -> None:
        if up in self._idle:
            up.sock.mark("idle_timeout")
            self._drop(up)

    def close_all(self, how: str | None = None) -> None:
        for up in list(self._idle):
            if how is not None:
                up.sock.mark(how)  # type: ignore[arg-type]
            self._drop(up)
