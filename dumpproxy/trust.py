"""What client connections have shown about trusting the dumpproxy CA, per server name.

A client that ends its TLS connection without an alert is either rejecting the CA or a
browser dropping a spare connection; `ClientTrust` tells the two apart from the sibling
connections to the same name. One table per run, in `context.Services`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dumpproxy.streams import TLSStream

# A client that closes this soon after the handshake, having sent nothing, may have
# rejected the certificate: GnuTLS clients (wget, git) check it only once the handshake is
# done, and then close without an alert.
SILENT_REJECT_WINDOW = 2.0
# How long what a client showed about trusting the CA counts for its server name, and how
# long an ended connection waits for a sibling to show it (see ClientTrust.settle).
TRUST_MEMORY = 60.0
SIBLING_WAIT = 1.0
SIBLING_POLL = 0.02


class ClientTrust:
    """What recent client connections showed about trusting the CA, per server name.

    A connection that ends without an alert, mid-handshake (Node rejects that way) or
    right after it without a request (GnuTLS clients do), is either a rejection or a
    browser's spare connection, dropped around when a sibling to the same name comes up.
    The sibling tells them apart: a handshake with the same name completed (mid-handshake
    drops), or a connection to it carried requests (drops after the handshake). The
    sibling may come after the drop (Chromium drops its first connection before it opens
    the one it uses), so the drop waits for it (`settle`)."""

    def __init__(self) -> None:
        self._handshakes: dict[str, float] = {}  # name -> last completed handshake
        self._proven: dict[str, float] = {}  # name -> last connection that carried data
        self._live: dict[str, set[TLSStream]] = {}

    async def settle(self, shown: Callable[[], bool]) -> bool:
        """Whether trust is `shown` (for a name), waiting at most SIBLING_WAIT for a sibling
        to show it. Nothing tells a lone client from a browser whose next connection is not
        yet here (its CONNECT unread, its name unknown), so a lone client's rejection is
        known only after the wait; a browser's spare is not blamed."""
        deadline = time.monotonic() + SIBLING_WAIT
        while not shown() and time.monotonic() < deadline:
            await asyncio.sleep(SIBLING_POLL)
        return shown()

    def _prune(self, table: dict[str, float], now: float) -> None:
        if len(table) > 4096:
            for name in [n for n, t in table.items() if now - t > TRUST_MEMORY]:
                del table[name]

    def handshake_done(self, name: str, ctls: TLSStream) -> None:
        now = time.monotonic()
        self._prune(self._handshakes, now)
        self._handshakes[name] = now
        self._live.setdefault(name, set()).add(ctls)

    def closed(self, name: str, ctls: TLSStream) -> None:
        live = self._live.get(name)
        if live is not None:
            live.discard(ctls)
            if not live:
                del self._live[name]
        if ctls.bytes_in:
            now = time.monotonic()
            self._prune(self._proven, now)
            self._proven[name] = now

    def handshaken(self, name: str) -> bool:
        return time.monotonic() - self._handshakes.get(name, -TRUST_MEMORY) < TRUST_MEMORY

    def proven(self, name: str) -> bool:
        if any(s.bytes_in for s in self._live.get(name, ())):
            return True
        return time.monotonic() - self._proven.get(name, -TRUST_MEMORY) < TRUST_MEMORY
