"""Replay files (SPEC §9.3): dumpproxy captures and HAR 1.2 documents read into `Recorded`
exchanges, response bodies read back on demand, and `dumpproxy replay --list`.

A capture is read once through `captures` (strictly: a malformed line is an error naming
FILE:LINE) and only an index is kept: per `response` event its request, status, headers
and the byte offset of its line, whose body is read again when it is served. A HAR file
is one JSON document: it is parsed whole and its response bodies are kept (as a browser
export is, in memory). Every mistake in a file is one `ReplayFileError` line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import re
import sys
from collections.abc import Iterable
from urllib.parse import urlsplit

import orjson

from dumpproxy.addresses import DEFAULT_PORTS
from dumpproxy.captures import Input, Malformed, NotACapture, Skipped
from dumpproxy.replay import (
    Recorded,
    Replay,
    Request,
    body_digest,
    header_items,
    response_headers,
)

RECORD_HINT = "record with --record-for-replay"
EVENT_START = re.compile(rb'\{\s*"(ts|event)"\s*:')  # the start of a capture's first line


class ReplayFileError(Exception):
    """A replay file that cannot be used: one line, naming FILE:LINE (or the HAR entry)."""


# --- reading ------------------------------------------------------------------------------


def load(names: list[str], ignore_params: Iterable[str] = (), ignore_body: bool = False,
         forward: bool = False) -> Replay:
    """Every file read into one Replay. Raises ReplayFileError."""
    entries: list[Recorded] = []
    for name in names:
        entries += read_file(name)
    return Replay(entries, ignore_params, ignore_body, forward)


def read_file(name: str) -> list[Recorded]:
    if name == "-":
        raise ReplayFileError("-: a replay file must be a file (its bodies are read again "
                              "when served), not standard input")
    try:
        with open(name, "rb") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if _looks_like_har(head):
                return har_entries(name, f.read())
            return capture_entries(name, Input(name, f, Skipped(), strict=True))
    except OSError as e:
        raise ReplayFileError(f"{name}: {e.strerror or e}") from None


def _looks_like_har(head: bytes) -> bool:
    """A capture's first line is one event object; anything else that starts as a JSON
    object is taken for a HAR document (and told so when it is not one)."""
    if not head.startswith(b"{"):
        return False
    first, newline, _ = head.partition(b"\n")
    if not newline:  # a line longer than the sniffed bytes: an event starts as we write it
        return not EVENT_START.match(first)
    try:
        ev = orjson.loads(first)
    except orjson.JSONDecodeError:
        return True  # pretty-printed: parsed whole
    return not (isinstance(ev, dict) and "event" in ev)


def _text(ev: dict, field: str) -> str | None:
    v = ev.get(field)
    return v if isinstance(v, str) else None


def _body(text: str, base64_encoded: bool) -> bytes | None:
    if not base64_encoded:
        return text.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _request_of(url: str, method: str) -> Request | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or not method:
        return None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Request(method.upper(), scheme, parts.hostname, port or DEFAULT_PORTS[scheme], path)


def capture_entries(name: str, inp: Input) -> list[Recorded]:
    """The `response` events of a capture, each with where its line starts."""
    entries: list[Recorded] = []
    try:
        try:
            inp.start()
        except NotACapture as e:
            raise ReplayFileError(f"{name}:1: not a dumpproxy capture or HAR file ({e})") \
                from None
        for ev in inp.events():
            if ev.get("event") != "response":
                continue
            source = f"{name}:{inp.line}"
            entries.append(_capture_entry(ev, source, (name, inp.offset)))
    except Malformed as e:
        raise ReplayFileError(str(e)) from None
    if not entries:
        raise ReplayFileError(f"{name}: no response events: nothing to replay")
    return entries


def _capture_entry(ev: dict, source: str, where: tuple[str, int]) -> Recorded:
    url, method, status = _text(ev, "url"), _text(ev, "method"), ev.get("status")
    req = _request_of(url or "", method or "")
    if req is None or type(status) is not int or not isinstance(ev.get("headers"), dict):
        raise ReplayFileError(f"{source}: a response event without a valid method, url, "
                              "status or headers")
    items, redacted = header_items(ev["headers"].items())
    problem = None
    if status == 101:
        problem = "an upgraded connection (WebSocket): not replayed"
    elif ev.get("aborted") or status < 200:
        problem = "the exchange was cut or failed (no complete response recorded)"
    elif not isinstance(ev.get("server"), int) and not ev.get("replayed"):
        problem = "answered by dumpproxy, not the destination"
    elif not isinstance(ev.get("response_body"), str):
        problem = f"no body recorded ({RECORD_HINT})"
    elif ev.get("response_body_truncated") or ev.get("request_body_truncated"):
        problem = f"its body was cut at --max-body-bytes ({RECORD_HINT})"
    digest = None
    request_body = ev.get("request_body")
    if isinstance(request_body, str):
        raw = _body(request_body, ev.get("request_body_encoding") == "base64")
        if raw is None:
            raise ReplayFileError(f"{source}: request_body is not valid base64")
        digest = body_digest(raw)
    return Recorded(req, digest, status, _text(ev, "reason") or "", items, source, where,
                    problem, _redacted_warning(redacted))


def _redacted_warning(redacted: bool) -> str | None:
    return ("served without its credential headers (redacted when recorded; "
            "--no-redact keeps them)") if redacted else None


def har_entries(name: str, data: bytes) -> list[Recorded]:
    """The entries of a HAR 1.2 document: ours (`dumpproxy har`) or a browser's export."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        line = data.count(b"\n", 0, e.pos) + 1 if isinstance(e.pos, int) else 1
        raise ReplayFileError(f"{name}:{line}: neither a dumpproxy capture nor a HAR file "
                              f"(not JSON: {e.msg})") from None
    log = doc.get("log") if isinstance(doc, dict) else None
    if not isinstance(log, dict) or not isinstance(log.get("entries"), list):
        raise ReplayFileError(f"{name}:1: neither a dumpproxy capture nor a HAR file (no "
                              "log.entries)")
    # A browser's export holds bodies decoded (HAR 1.2: content.text), ours as they were
    # sent: a browser's content-encoding no longer describes its body.
    creator = log.get("creator")
    decoded = not (isinstance(creator, dict) and creator.get("name") == "dumpproxy")
    entries = [_har_entry(entry, f"{name}#entry {i}", decoded)
               for i, entry in enumerate(log["entries"], 1)]
    if not entries:
        raise ReplayFileError(f"{name}: a HAR file without entries: nothing to replay")
    return entries


def _pairs(headers: object) -> list[tuple[str, str]] | None:
    if not isinstance(headers, list):
        return None
    out = []
    for h in headers:
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) or \
                not isinstance(h.get("value"), str):
            return None
        out.append((h["name"], h["value"]))
    return out


def _har_entry(entry: object, source: str, decoded: bool) -> Recorded:
    rq = entry.get("request") if isinstance(entry, dict) else None
    rs = entry.get("response") if isinstance(entry, dict) else None
    if not isinstance(rq, dict) or not isinstance(rs, dict):
        raise ReplayFileError(f"{source}: not a HAR entry (request and response objects)")
    req = _request_of(_text(rq, "url") or "", _text(rq, "method") or "")
    status = rs.get("status")
    pairs = _pairs(rs.get("headers"))
    if req is None or type(status) is not int or pairs is None:
        raise ReplayFileError(f"{source}: a HAR entry without a valid method, url, status "
                              "or headers")
    # HTTP/2 entries (Chromium) may carry pseudo-headers: not the response's own fields
    items, redacted = header_items((n, v) for n, v in pairs if not n.startswith(":") and not (
        decoded and n.lower() == "content-encoding"))
    digest = None
    post = rq.get("postData")
    if isinstance(post, dict) and isinstance(post.get("text"), str):
        enc = post.get("_encoding") or post.get("encoding")
        if enc == "latin-1":  # ours: one character per byte of a body that is not UTF-8
            raw = post["text"].encode("latin-1", "replace")
        else:
            raw = _body(post["text"], enc == "base64")
        if raw is None:
            raise ReplayFileError(f"{source}: postData.text is not valid base64")
        digest = body_digest(raw)
    content = rs.get("content")
    body: bytes | None = b""
    problem = None
    if status < 200 or isinstance(rs.get("_error"), str) or isinstance(
            entry.get("_error"), str):  # type: ignore[union-attr]
        problem = "the exchange was cut or failed (no complete response recorded)"
    elif isinstance(content, dict) and isinstance(content.get("text"), str):
        body = _body(content["text"], content.get("encoding") == "base64")
        if body is None:
            raise ReplayFileError(f"{source}: content.text is not valid base64")
        if "truncated" in str(content.get("comment", "")):
            problem = f"its body was cut at --max-body-bytes ({RECORD_HINT})"
    elif isinstance(content, dict) and content.get("size") not in (0, None) and \
            status not in (204, 304) and _text(rq, "method") != "HEAD":
        problem = "no body in the HAR (export it with content)"
    return Recorded(req, digest, status, _text(rs, "statusText") or "", items, source,
                    body, problem, _redacted_warning(redacted))


def read_body(rec: Recorded) -> bytes:
    """The response body of a recorded exchange: from the HAR entry, or its capture line
    read again."""
    if isinstance(rec.where, bytes):
        return rec.where
    name, offset = rec.where  # type: ignore[misc]
    with open(name, "rb") as f:
        f.seek(offset)
        ev = orjson.loads(f.readline())
    body = _body(ev["response_body"], ev.get("response_body_encoding") == "base64")
    return body or b""


class BodyUnreadable(Exception):
    """A recorded body that could not be read again (the file changed since start-up)."""


async def recorded_response(rec: Recorded, method: str) -> tuple[list[tuple[bytes, bytes]],
                                                                  bytes]:
    """The recorded response as a client gets it: headers recomputed, and the body, read
    again in a thread (a big one must not hold up the event loop). Raises BodyUnreadable."""
    if method == "HEAD" or rec.status in (204, 304):
        data = b""
    elif isinstance(rec.where, bytes):
        data = rec.where
    else:
        try:
            data = await asyncio.to_thread(read_body, rec)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise BodyUnreadable(f"{rec.source}: cannot read the recorded body: {e}") \
                from None
    return response_headers(rec, method, len(data)), data


def startup_lines(replay: Replay) -> list[str]:
    """What cannot be replayed faithfully: one line per entry, for stderr."""
    out = []
    for rec in replay.entries:
        if rec.problem is not None:
            out.append(f"{rec.source}: {rec.request.shown}: not replayed: {rec.problem}")
        elif rec.warning is not None:
            out.append(f"{rec.source}: {rec.request.shown}: {rec.warning}")
    return out


# --- dumpproxy replay --list ------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, as the proxy's own options have: exit 2."""

    def error(self, message: str):  # type: ignore[override]
        print(f"dumpproxy: error: replay: {message} (dumpproxy replay --list FILE...)",
              file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="dumpproxy replay",
        usage="dumpproxy replay --list FILE...",
        description="Show what replay files (dumpproxy captures made with --bodies or "
                    "--record-for-replay, HAR 1.2 files) can serve: one line per recorded "
                    "exchange, SOURCE METHOD URL STATUS and whether it is replayable.")
    p.add_argument("--list", action="store_true", required=True,
                   help="list the recorded exchanges (the only action)")
    p.add_argument("files", nargs="+", metavar="FILE", help="captures or HAR files")
    return p


def listing(entries: list[Recorded]) -> str:
    lines = []
    for rec in entries:
        verdict = "replayable" if rec.problem is None else f"not replayable: {rec.problem}"
        if rec.problem is None and rec.warning is not None:
            verdict += f" ({rec.warning})"
        lines.append(f"{rec.source} {rec.request.shown} {rec.status} {verdict}\n")
    return "".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        entries = [rec for name in args.files for rec in read_file(name)]
    except ReplayFileError as e:
        print(f"dumpproxy: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(listing(entries))
    sys.stdout.flush()
    return 0
