"""`dumpproxy har [FILE...]`: event streams to one HAR 1.2 document.

Two halves: `HarConverter` is the pure conversion (events in, finished HAR entries out, no
I/O), and `main` reads files or stdin line by line and writes the document as entries
complete: the `log` head, then each entry, then the tail. What the converter holds is
bounded by what is open in the capture: the `request` events still waiting for their
`response`, and per open client connection its upstream connections and last error.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import os
import sys
from collections.abc import Iterable
from typing import IO
from urllib.parse import parse_qsl, urlsplit

import orjson

from dumpproxy import __version__
from dumpproxy.captures import Skipped, open_captures

HAR_VERSION = "1.2"

Key = tuple[int, int, int]  # (run, conn, flow)
# HAR has no fixed spelling of HTTP versions; browsers' exports set the convention, and
# HAR readers (mitmproxy's among them) know "HTTP/2" (Firefox) and "http/2.0" (Chrome).
HAR_VERSIONS = {"HTTP/2.0": "HTTP/2"}
# Why an exchange was cut (response.aborted), as a HAR reader is told (response._error).
ABORTED = {"client": "aborted: the client went away or cancelled",
           "server": "aborted: the server broke off",
           "shutdown": "aborted: dumpproxy shut down"}


def har_version(version: str) -> str:
    return HAR_VERSIONS.get(version, version)


def iso_time(ts: float) -> str:
    """Unix seconds -> ISO 8601 with milliseconds, UTC, as HAR writers use."""
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return dt.isoformat(timespec="milliseconds")


def ip_only(address: str) -> str:
    """`127.0.0.1:443` -> `127.0.0.1`, `[::1]:443` -> `::1` (serverIPAddress has no port)."""
    if address.startswith("["):
        return address[1:].partition("]")[0]
    return address.rpartition(":")[0] or address


def har_headers(headers: object) -> list[dict]:
    """An event's header object -> HAR name/value pairs; set-cookie lines split again."""
    out: list[dict] = []
    if not isinstance(headers, dict):
        return out
    for name, value in headers.items():
        value = str(value)
        parts = value.split("\n") if name == "set-cookie" else [value]
        out.extend({"name": name, "value": v} for v in parts)
    return out


def request_cookies(headers: dict) -> list[dict]:
    cookies = []
    for part in str(headers.get("cookie", "")).split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            cookies.append({"name": name, "value": value})
    return cookies


def response_cookies(headers: dict) -> list[dict]:
    cookies = []
    for line in str(headers.get("set-cookie", "")).split("\n"):
        first, *attrs = line.split(";")
        name, eq, value = first.strip().partition("=")
        if not (eq and name):
            continue  # redacted or empty
        cookie: dict = {"name": name, "value": value}
        for attr in attrs:
            key, _, val = attr.strip().partition("=")
            key = key.lower()
            if key in ("path", "domain"):
                cookie[key] = val
            elif key == "httponly":
                cookie["httpOnly"] = True
            elif key == "secure":
                cookie["secure"] = True
        cookies.append(cookie)
    return cookies


def query_string(url: str) -> list[dict]:
    try:
        query = urlsplit(url).query
    except ValueError:
        return []
    return [{"name": k, "value": v} for k, v in parse_qsl(query, keep_blank_values=True)]


def _body_notes(ev: dict, prefix: str) -> tuple[bool, list[str]]:
    """(base64?, comments) for a captured body."""
    b64 = ev.get(f"{prefix}_encoding") == "base64"
    notes = []
    if b64:
        notes.append("base64: the body is not UTF-8")
    if ev.get(f"{prefix}_truncated"):
        notes.append("truncated: only the first --max-body-bytes bytes were captured")
    return b64, notes


def _post_data(resp: dict, mime: str) -> dict:
    """HAR's postData has text only: a body that is not UTF-8 is written as Latin-1 text,
    one character per byte, which HAR readers turn back into the same bytes (mitmproxy
    for one); `_encoding` says so for readers that want to be sure."""
    b64, notes = _body_notes(resp, "request_body")
    text = str(resp["request_body"])
    post: dict = {"mimeType": mime, "text": text}
    if b64:
        try:
            post["text"] = base64.b64decode(text).decode("latin-1")
            post["_encoding"] = "latin-1"
            notes[0] = "not UTF-8: one Latin-1 character per byte"
        except ValueError:
            post["_encoding"] = "base64"
    if notes:
        post["comment"] = "; ".join(notes)
    return post


class _Conn:
    """What is known about one client connection while it is open."""

    __slots__ = ("servers", "last", "error")

    def __init__(self) -> None:
        self.servers: dict[str, dict] = {}  # address -> its server_connect event
        self.last: dict | None = None  # the latest server_connect
        self.error: str | None = None  # the latest error without a flow


class HarConverter:
    """Feed events in order; get HAR entries back as exchanges complete.

    Several runs may follow each other (`-o` appends, files are concatenated): a
    `listening` event after traffic, after `shutdown` or from another pid starts a new
    run, and what the old run left open is written as failed.
    """

    def __init__(self) -> None:
        self.run = 0
        self._run_pid: object = None
        self._run_open = False  # the current run has seen more than `listening` events
        self._run_closed = False
        self.open: dict[Key, dict] = {}  # request events waiting for their response
        # the `error` (stage: message) that explains an open exchange, until its response
        self.explained: dict[Key, tuple[str, dict]] = {}
        self.conns: dict[tuple[int, int], _Conn] = {}
        self.entries = 0
        self.failed = 0

    # -- input --
    def feed(self, ev: dict) -> list[dict]:
        kind = ev.get("event")
        out: list[dict] = []
        if kind == "listening":
            if self._run_open or self._run_closed or ev.get("pid") != self._run_pid:
                out = self._end_run("the capture ended without a response")
                self.run += 1
                self._run_pid = ev.get("pid")
                self._run_open = self._run_closed = False
            return out
        self._run_open = True
        conn = ev.get("conn")
        if kind == "shutdown":
            self._run_closed = True
            return self._end_run("dumpproxy shut down before the response")
        if not isinstance(conn, int):
            return out
        ckey = (self.run, conn)
        if kind == "request":
            key = (self.run, conn, ev.get("flow"))
            if key in self.open:  # a flow number seen twice: runs mixed up; keep the new one
                out.append(self._fail(key, "no response in the capture"))
            self.open[key] = ev  # type: ignore[index]
            self.conns.setdefault(ckey, _Conn())
        elif kind == "response":
            key = (self.run, conn, ev.get("flow"))  # type: ignore[assignment]
            req = self.open.pop(key, None)
            why = self.explained.pop(key, None)
            out.append(self._entry(req, ev, why[0] if why else None))
        elif kind == "error":
            flow = ev.get("flow")
            message = f"{ev.get('stage', 'error')}: {ev.get('message', '')}"
            key = (self.run, conn, flow)  # type: ignore[assignment]
            if isinstance(flow, int) and key in self.open:
                # its response follows (the client's answer); a capture that ends before it
                # gets the exchange as failed, with this explanation
                self.explained[key] = (message, ev)
            elif not isinstance(flow, int):
                self.conns.setdefault(ckey, _Conn()).error = message
        elif kind == "decision" and isinstance(ev.get("flow"), int):
            key = (self.run, conn, ev["flow"])  # type: ignore[assignment]
            if key in self.open:  # a blocked request: the policy explains its 403
                pattern, source = ev.get("pattern"), ev.get("source")
                message = f"{ev.get('action')}: {ev.get('reason')}" + (
                    f" {pattern!r}" if pattern else "") + (f" ({source})" if source else "")
                self.explained[key] = (message, ev)
        elif kind == "server_connect":
            c = self.conns.setdefault(ckey, _Conn())
            c.servers[str(ev.get("address"))] = ev
            c.last = ev
        elif kind == "client_disconnect":
            c = self.conns.pop(ckey, None)
            why = (c.error if c else None) or "the client connection closed before the response"
            for key in [k for k in self.open if k[:2] == ckey]:
                out.append(self._fail(key, why, c))
        return out

    def _fail(self, key: Key, why: str, conn_state: _Conn | None = None) -> dict:
        """An open exchange that gets no response in the input: failed, explained by its
        own error when there was one."""
        req = self.open.pop(key)
        explained = self.explained.pop(key, None)
        if explained is not None:
            return self._failed(req, explained[1], explained[0], conn_state)
        return self._failed(req, None, why, conn_state)

    def close(self) -> list[dict]:
        """End of input: what is still open failed ("no response by the end")."""
        return self._end_run("no response by the end of the capture")

    def _end_run(self, why: str) -> list[dict]:
        out = []
        for key in list(self.open):
            c = self.conns.get(key[:2])
            out.append(self._fail(key, (c.error if c else None) or why, c))
        self.conns.clear()
        return out

    # -- entries --
    def _server(self, conn: int, req: dict | None, resp: dict | None) -> dict | None:
        c = self.conns.get((self.run, conn))
        if c is None:
            return None
        src = req or resp or {}
        host, port = src.get("host"), src.get("port")
        if host is not None and port is not None:
            addr = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
            if addr in c.servers:
                return c.servers[addr]
        return c.last

    def _entry(self, req: dict | None, resp: dict, explanation: str | None = None) -> dict:
        """An exchange with its response (with its request when the input has it): status
        as the client saw it; why it failed or was cut, if it was, as its comment."""
        self.entries += 1
        conn = resp.get("conn")
        total = float(resp.get("duration_ms") or 0.0)
        start = float(resp.get("ts") or 0.0) - total / 1000
        rq = req or {}
        req_headers = rq.get("headers") if isinstance(rq.get("headers"), dict) else {}
        resp_headers = resp.get("headers") if isinstance(resp.get("headers"), dict) else {}
        version = har_version(str(resp.get("http_version") or rq.get("http_version") or ""))
        request = self._request(rq or resp, req_headers, version)  # type: ignore[arg-type]
        request["bodySize"] = int(resp.get("request_bytes") or 0)
        if "request_body" in resp and (request["bodySize"] or resp["request_body"]):
            request["postData"] = _post_data(resp, str(req_headers.get("content-type", "")))
        if req is None:
            request["comment"] = "the request event is not in the input"
        content: dict = {"size": int(resp.get("response_bytes") or 0),
                         "mimeType": str(resp_headers.get("content-type", ""))}
        if "response_body" in resp:
            b64, notes = _body_notes(resp, "response_body")
            content["text"] = str(resp["response_body"])
            if b64:
                content["encoding"] = "base64"
            if notes:
                content["comment"] = "; ".join(notes)
        response = {
            "status": int(resp.get("status") or 0),
            "statusText": str(resp.get("reason") or ""),
            "httpVersion": version,
            "cookies": response_cookies(resp_headers),  # type: ignore[arg-type]
            "headers": har_headers(resp_headers),
            "content": content,
            "redirectURL": str(resp_headers.get("location", "")),
            "headersSize": -1,
            "bodySize": content["size"],
        }
        server = self._server(conn, req, resp) if isinstance(conn, int) else None
        connect = -1.0
        if server is not None and float(server.get("ts") or 0) >= start:
            # this exchange opened the upstream connection: its connect time is part of it
            connect = min(float(server.get("connect_ms") or 0.0), total)
        timings = {"blocked": -1, "dns": -1, "connect": connect, "ssl": -1, "send": 0,
                   "wait": round(total - max(connect, 0.0), 3), "receive": 0}
        entry = self._wrap(start, total, request, response, timings, server, resp)
        why = [w for w in (ABORTED.get(str(resp.get("aborted"))), explanation) if w]
        if why:  # failed, answered by dumpproxy, or cut short: as browsers mark them
            self.failed += 1
            response["_error"] = entry["comment"] = "; ".join(why)
        return entry

    def _failed(self, req: dict, err: dict | None, message: str,
                conn_state: _Conn | None = None) -> dict:
        """A request that got no response: status 0 and the reason as the comment."""
        self.entries += 1
        self.failed += 1
        start = float(req.get("ts") or 0.0)
        end = float(err.get("ts") or start) if err else start
        total = round(max(end - start, 0.0) * 1000, 3)
        headers = req.get("headers") if isinstance(req.get("headers"), dict) else {}
        request = self._request(req, headers,  # type: ignore[arg-type]
                                har_version(str(req.get("http_version") or "")))
        request["bodySize"] = -1
        response = {"status": 0, "statusText": "", "httpVersion": "", "cookies": [],
                    "headers": [], "content": {"size": 0, "mimeType": ""}, "redirectURL": "",
                    "headersSize": -1, "bodySize": -1, "_error": message}
        timings = {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": 0,
                   "wait": total, "receive": 0}
        conn = req.get("conn")
        if conn_state is not None:
            server = conn_state.last
        else:
            server = self._server(conn, req, None) if isinstance(conn, int) else None
        entry = self._wrap(start, total, request, response, timings, server, req)
        entry["comment"] = message
        return entry

    @staticmethod
    def _request(ev: dict, headers: dict, version: str) -> dict:
        url = str(ev.get("url") or "")
        return {
            "method": str(ev.get("method") or ""),
            "url": url,
            "httpVersion": version,
            "cookies": request_cookies(headers),
            "headers": har_headers(headers),
            "queryString": query_string(url),
            "headersSize": -1,
            "bodySize": 0,
        }

    @staticmethod
    def _wrap(start: float, total: float, request: dict, response: dict, timings: dict,
              server: dict | None, ev: dict) -> dict:
        entry: dict = {
            "startedDateTime": iso_time(start),
            "time": round(total, 3),
            "request": request,
            "response": response,
            "cache": {},
            "timings": timings,
        }
        if server is not None and server.get("ip"):
            entry["serverIPAddress"] = ip_only(str(server["ip"]))
        # the upstream connection that carried it (SPEC §9.2), else the client's
        if ev.get("server") is not None:
            entry["connection"] = str(ev["server"])
        elif ev.get("conn") is not None:  # a capture without upstream numbers
            entry["connection"] = str(ev["conn"])
        if ev.get("flow") is not None:
            entry["_flow"] = ev["flow"]
        return entry


# -- the document, written piece by piece ------------------------------------------------


def document_head() -> bytes:
    creator = {"name": "dumpproxy", "version": __version__}
    head = orjson.dumps({"version": HAR_VERSION, "creator": creator, "pages": []})
    # the log object stays open: entries follow, then document_tail closes it
    return b'{"log":' + head[:-1] + b',"entries":['


def document_tail(comment: str) -> bytes:
    return b'\n],"comment":' + orjson.dumps(comment) + b"}}\n"


def convert(events: Iterable[dict]) -> dict:
    """The whole document at once (for small inputs and tests)."""
    conv = HarConverter()
    entries = [e for ev in events for e in conv.feed(ev)]
    entries += conv.close()
    return {"log": {"version": HAR_VERSION,
                    "creator": {"name": "dumpproxy", "version": __version__},
                    "pages": [], "entries": entries}}


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="dumpproxy har",
        usage="dumpproxy har [-h] [FILE ...]",
        description="Convert dumpproxy event streams (JSON Lines) to one HAR 1.2 document "
                    "on stdout: one entry per exchange, failed ones with status 0 and the "
                    "error as comment. Entries are written as exchanges complete; only open "
                    "exchanges are held in memory. Malformed lines are skipped with a "
                    "warning naming FILE:LINE; a file without a single event (a HAR, a "
                    "--format text capture) is an error (exit 2), before any output.",
    )


class OutputError(Exception):
    pass


class ReaderGone(Exception):
    pass


class Output:
    """The document on a binary stream, entries separated as JSON wants."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.sep = b"\n"

    def write(self, data: bytes, flush: bool = False) -> None:
        try:
            self.out.write(data)
            if flush:
                self.out.flush()
        except BrokenPipeError:
            raise ReaderGone() from None
        except OSError as e:
            raise OutputError(e.strerror or str(e)) from None

    def entry(self, entry: dict) -> None:
        self.write(self.sep + orjson.dumps(entry))
        self.sep = b",\n"


def main(argv: list[str]) -> int:
    parser = build_parser()
    parser.add_argument("files", metavar="FILE", nargs="*",
                        help="event files, read in order as one stream ('-' or none: stdin)")
    args = parser.parse_args(argv)
    names = args.files or ["-"]
    if names.count("-") > 1:
        print("dumpproxy: error: standard input ('-') can be read only once", file=sys.stderr)
        return 2
    skipped = Skipped()
    inputs = open_captures(names, skipped)
    if isinstance(inputs, int):
        return inputs
    out = Output(sys.stdout.buffer)
    conv = HarConverter()
    try:
        out.write(document_head())
        for inp in inputs:
            try:
                for ev in inp.events():
                    for entry in conv.feed(ev):
                        out.entry(entry)
            except OSError as e:  # reading failed
                print(f"dumpproxy: error: {inp.name}: {e.strerror or e}", file=sys.stderr)
                return 1
            finally:
                inp.close()
        for entry in conv.close():
            out.entry(entry)
        comment = f"converted by dumpproxy har: {conv.entries} entries ({conv.failed} failed)"
        if skipped.count:
            comment += f"; {skipped.count} input lines skipped"
        out.write(document_tail(comment), flush=True)
    except ReaderGone:
        # the reader went away (`| head`): stop quietly, as the proxy does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OutputError as e:
        print(f"dumpproxy: error: standard output: {e}", file=sys.stderr)
        return 1
    return 0
