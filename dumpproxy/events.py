"""The event writer: one JSON line (or text line) per event, batched, never interleaved.

Lines are appended to an in-memory batch and written with one blocking os.write per
batch, at most FLUSH_DELAY after the first line of the batch (or at once when it grows
large). A blocking write on a full pipe stalls the event loop: that is the back-pressure
the contract asks for, and it keeps memory bounded. When the reader goes away the writer
calls `on_broken` once and drops everything after. When the output fails (disk full, file
too large, I/O error) it takes back a batch it wrote in part (no half line is left in a
file), calls `on_failed` with the reason, and writes nothing more.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from collections.abc import Callable

import orjson

from dumpproxy.textformat import format_text

FLUSH_DELAY = 0.02  # seconds; well under the 100 ms promise
FLUSH_BYTES = 64 * 1024

_OPTS = orjson.OPT_APPEND_NEWLINE


class EventWriter:
    def __init__(self, fd: int, fmt: str = "json", on_broken: Callable[[], None] | None = None,
                 on_failed: Callable[[str], None] | None = None):
        self.fd = fd
        self.text = fmt == "text"
        self.on_broken = on_broken
        self.on_failed = on_failed
        self.broken = False  # nothing more is written: the reader left or the output failed
        self.failure: str | None = None  # why the output failed (ENOSPC, EFBIG, EIO...)
        try:  # a regular file can have a partly written batch cut back off
            self._seekable = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._seekable = False
        self._batch: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        try:
            os.set_blocking(fd, True)
        except OSError:
            pass

    def emit(self, event: str, fields: dict | None = None, conn: object | None = None) -> dict:
        """Write one event: ts, event, conn/client (when tied to a connection), fields."""
        if conn is not None:  # (one dict display: the most frequent shape)
            ev: dict = {"ts": round(time.time(), 6), "event": event,
                        "conn": conn.id, "client": conn.client,  # type: ignore[attr-defined]
                        **(fields or {})}
        else:
            ev = {"ts": round(time.time(), 6), "event": event}
            if fields:
                ev.update(fields)
        self.write(ev)
        return ev

    def write(self, ev: dict) -> None:
        if self.broken:
            return
        if self.text:
            line = format_text(ev)
            if line is None:
                return
            data = line.encode()
        else:
            data = orjson.dumps(ev, option=_OPTS)
        self._batch.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch or self.broken:
            return
        data = b"".join(self._batch) if len(self._batch) > 1 else self._batch[0]
        self._batch.clear()
        self._size = 0
        view = memoryview(data)
        start = os.lseek(self.fd, 0, os.SEEK_CUR) if self._seekable else None
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except (BrokenPipeError, ConnectionResetError):
            self._break()
        except BlockingIOError:
            # A non-blocking descriptor we could not switch: wait for it, keep order.
            import select

            while view:
                select.select([], [self.fd], [])
                try:
                    n = os.write(self.fd, view)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self._break()
                    return
                except OSError as e:
                    self._fail(e, None)
                    return
                view = view[n:]
        except OSError as e:
            self._fail(e, start)

    def close(self) -> None:
        """Flush, then write nothing more (the last event was written)."""
        self.flush()
        self.broken = True

    def _fail(self, e: OSError, start: int | None) -> None:
        if start is not None:  # take back the part of the batch that got in: no half line
            try:
                os.ftruncate(self.fd, start)
                os.lseek(self.fd, start, os.SEEK_SET)
            except OSError:
                pass
        self.broken = True
        self._batch.clear()
        self.failure = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
        if self.on_failed is not None:
            self.on_failed(self.failure)

    def reopen(self, path: str) -> None:
        """SIGHUP with `-o FILE`: the batch goes whole to the old file, then every later
        event to a new one at `path` (logrotate renamed the old one). Events are written on
        the loop's thread, so none can fall between. Raises OSError, and then the old file
        stays in use."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.flush()
        old, self.fd = self.fd, fd
        self._seekable = stat.S_ISREG(os.fstat(fd).st_mode)
        os.close(old)

    def _break(self) -> None:
        self.broken = True
        self._batch.clear()
        if self.on_broken is not None:
            self.on_broken()
