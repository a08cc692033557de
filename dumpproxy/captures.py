"""Reading captures: the JSON Lines files dumpproxy writes, as its subcommands read them.

One reader for every subcommand that takes captures (`har`, and what replays or summarises
a record): a malformed line is skipped and named as FILE:LINE on stderr (the first
MAX_WARNINGS of them, all counted), and a file without a single event is the wrong file,
an error before any output.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import IO

import orjson

MAX_WARNINGS = 10  # malformed lines reported one by one; the rest only counted


class Skipped:
    """Lines skipped in all inputs: the first MAX_WARNINGS named on stderr, all counted."""

    def __init__(self) -> None:
        self.count = 0
        self.shown = 0

    def show(self, warnings: list[str]) -> None:
        for text in warnings:
            self.shown += 1
            if self.shown <= MAX_WARNINGS:
                print(f"dumpproxy: warning: {text}, skipped", file=sys.stderr)
            elif self.shown == MAX_WARNINGS + 1:
                print("dumpproxy: warning: more lines skipped (counted in the HAR's comment)",
                      file=sys.stderr)


class NotACapture(Exception):
    """A file with lines but not one dumpproxy event in them: the wrong file."""


class Malformed(Exception):
    """A malformed line in a file read strictly (FILE:LINE: why)."""


class Input:
    """Event lines from one file; a malformed line is skipped and reported as FILE:LINE
    (strict: it is an error, `Malformed`). While an event is being consumed, `line` and
    `offset` say where it is in the file (its line number, the byte offset of its start).

    `start` reads up to the first event before anything is written, so that a file that
    holds none (a HAR document, a --format text capture) is an error, not an empty HAR;
    its warnings are held until then (one error says it all)."""

    def __init__(self, name: str, f: IO[bytes], skipped: Skipped, strict: bool = False):
        self.name = name
        self.f = f
        self.skipped = skipped
        self.strict = strict
        self.line = 0
        self.offset = 0
        self._held: list[str] | None = []  # warnings before the first event; None: shown
        self._first_line = b""  # the first non-blank line, to say what the file is
        self._lines = 0  # complete non-blank lines
        self._events = self._read()
        self._first: dict | None = None

    def start(self) -> None:
        """Read up to the first event. Raises NotACapture when there is none."""
        self._first = next(self._events, None)
        if self._first is None and self._lines:
            raise NotACapture(f"{self.name}: not a dumpproxy capture: none of its "
                              f"{self._lines} lines is an event ({self._what()})")

    @property
    def empty(self) -> bool:
        """No event at all (after `start`): an empty file."""
        return self._first is None

    def events(self) -> Iterator[dict]:
        """The events, from the first (`start` first); held warnings shown in order."""
        held, self._held = self._held or [], None
        self.skipped.show(held)
        if self._first is not None:
            yield self._first
            yield from self._events

    def _what(self) -> str:
        line = self._first_line.strip()
        if re.match(rb'\{\s*("log"\s*:|$)', line):  # pretty-printed or on one line
            return "a HAR document already?"
        if line[:1] in (b"{", b"["):
            return 'the JSON lines dumpproxy writes have an "event" field'
        return "a --format text capture? only the JSON lines of the default --format " \
               "json convert"

    def _skip(self, number: int, why: str) -> None:
        text = f"{self.name}:{number}: {why}"
        if self.strict:
            raise Malformed(text)
        self.skipped.count += 1
        if self._held is None:
            self.skipped.show([text])
        elif len(self._held) <= MAX_WARNINGS:  # beyond that only counted
            self._held.append(text)

    def _read(self) -> Iterator[dict]:
        offset = 0
        for number, line in enumerate(self.f, 1):
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                # the last line of a capture still being written (or cut off): not an event yet
                self._skip(number, "incomplete last line")
                return
            if not line.strip():
                continue
            self._lines += 1
            if not self._first_line:
                self._first_line = line[:1000]
            try:
                ev = orjson.loads(line)
            except orjson.JSONDecodeError:
                self._skip(number, "not a JSON line")
                continue
            if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
                self._skip(number, "not a dumpproxy event")
                continue
            self.line, self.offset = number, start
            yield ev

    def close(self) -> None:
        if self.f is not sys.stdin.buffer:
            self.f.close()


def open_captures(names: list[str], skipped: Skipped) -> list[Input] | int:
    """Every file opened and shown to hold events before anything is written; on failure
    one error line on stderr, all files closed, and the exit status (2 for a user's
    mistake, 1 for a read error)."""
    inputs: list[Input] = []
    for name in names:  # all opened first: a bad name fails before any output
        try:
            f = sys.stdin.buffer if name == "-" else open(name, "rb")
        except OSError as e:
            print(f"dumpproxy: error: {name}: {e.strerror or e}", file=sys.stderr)
            for i in inputs:
                i.close()
            return 2
        inputs.append(Input(name, f, skipped))
    for inp in inputs:
        try:
            inp.start()
        except (NotACapture, OSError) as e:
            why = e if isinstance(e, NotACapture) else f"{inp.name}: {e.strerror or e}"
            print(f"dumpproxy: error: {why}", file=sys.stderr)
            for i in inputs:
                i.close()
            return 2 if isinstance(e, NotACapture) else 1
    return inputs
