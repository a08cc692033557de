"""The relay: bytes copied verbatim both ways, half-close preserved, idle timeout."""

from __future__ import annotations

import asyncio
import time

from dumpproxy.streams import Stream, StreamTimeout

IDLE_TIMEOUT = 600.0  # SPEC §7: no byte either way for 10 minutes closes a tunnel


class RelayIdle(Exception):
    pass


class Relay:
    """Copy client<->server until both directions have ended. Counts bytes each way."""

    def __init__(self, client: Stream, server: Stream, idle_timeout: float = IDLE_TIMEOUT,
                 first_timeout: float | None = None):
        """first_timeout: how long the first byte (either way) may take, when shorter."""
        self.client = client
        self.server = server
        self.idle_timeout = idle_timeout
        self._limit = idle_timeout if first_timeout is None else first_timeout
        self.to_server = 0
        self.to_client = 0
        self._last = time.monotonic()
        self.reset_by: str | None = None  # "client" or "server": who reset the connection
        self.half_closed = False  # one direction had ended (EOF) before any reset

    def teardown(self, e: BaseException) -> bool:
        """Was this failure part of an orderly end, not something to report? A client
        that resets (a browser closing its page) ends its own connection; a server that
        resets after one direction already ended is tearing down too."""
        if not isinstance(e, (ConnectionError, OSError)) or isinstance(e, TimeoutError):
            return False
        return self.reset_by == "client" or self.half_closed

    async def _pump(self, src: Stream, dst: Stream, upstream: bool) -> None:
        try:
            await self._copy(src, dst, upstream)
        except (ConnectionError, OSError) as e:
            if self.reset_by is None:  # a failed read names the source, a failed write
                # the destination
                self.reset_by = getattr(e, "_relay_side", None) or (
                    "client" if upstream else "server")
            raise

    async def _copy(self, src: Stream, dst: Stream, upstream: bool) -> None:
        dst_name = "server" if upstream else "client"
        while True:
            try:
                data = await src.read(self._limit)
            except StreamTimeout:
                # Idle only if the other direction was quiet too.
                if time.monotonic() - self._last >= self._limit:
                    raise RelayIdle(f"no data either way for {self._limit:g} s") from None
                continue
            if not data:
                self.half_closed = True
                dst.write_eof()
                return
            self._last = time.monotonic()
            self._limit = self.idle_timeout
            if upstream:
                self.to_server += len(data)
            else:
                self.to_client += len(data)
            try:
                dst.write(data)
                await dst.drain()
            except (ConnectionError, OSError) as e:
                e._relay_side = dst_name  # type: ignore[attr-defined]
                raise

    async def run(self) -> None:
        """Returns when both directions ended; raises on reset or idle (both sides aborted)."""
        up = asyncio.ensure_future(self._pump(self.client, self.server, True))
        down = asyncio.ensure_future(self._pump(self.server, self.client, False))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await asyncio.gather(up, down)
        except BaseException as e:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            if isinstance(e, RelayIdle):  # both end as any connection the timeout cuts
                self.client.mark("idle_timeout")
                self.server.mark("idle_timeout")
            if self.teardown(e):  # the other side gets an orderly close, not a reset
                self.client.close()
                self.server.close()
            else:
                self.client.abort()
                self.server.abort()
            raise
