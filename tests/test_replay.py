"""Replay (SPEC §9.3), without a network: matching, order, closest misses, response heads
(pure `replay`); the file readers (`replaysource`: captures, ours and Chromium's HAR,
Hypothesis on arbitrary input); `dumpproxy replay --list` and the one-line errors for
malformed or foreign replay files. The real clients are in test_replay_clients.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import orjson
import pytest
from conftest import DumpProxy, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dumpproxy.replay import Recorded, Replay, Request, body_digest, response_headers
from dumpproxy.replaysource import ReplayFileError, har_entries, read_body, read_file

DATA = Path(__file__).parent / "data"


def rec(path: str, status: int = 200, method: str = "GET", host: str = "app.test",
        body: bytes | None = b"", source: str = "cap:1", headers=(), problem=None) -> Recorded:
    return Recorded(Request(method, "https", host, 443, path),
                    None if body is None else body_digest(body), status, "OK",
                    list(headers), source, b"", problem)


def req(path: str, method: str = "GET", host: str = "app.test") -> Request:
    return Request(method, "https", host, 443, path)


# --- matching -----------------------------------------------------------------------------


def test_repeats_get_the_recorded_order_then_the_last_again():
    r = Replay([rec("/a", 200, source="1"), rec("/b", source="2"), rec("/a", 201, source="3"),
                rec("/a", 202, source="4")])
    assert [r.match(req("/a"), b"").source for _ in range(5)] == ["1", "3", "4", "4", "4"]
    assert r.match(req("/b"), b"").source == "2"


def test_match_is_method_scheme_host_port_path_query():
    r = Replay([rec("/a?x=1&y=2")])
    assert r.match(req("/a?x=1&y=2"), b"") is not None
    assert r.match(req("/a?y=2&x=1"), b"") is None  # parameter order is part of the query
    assert r.match(req("/a?x=1&y=2", "POST"), b"") is None
    assert r.match(req("/a?x=1&y=2", host="cdn.test"), b"") is None
    assert r.match(Request("GET", "http", "app.test", 443, "/a?x=1&y=2"), b"") is None
    assert r.match(Request("GET", "https", "app.test", 8443, "/a?x=1&y=2"), b"") is None
    assert r.match(Request("GET", "https", "APP.test", 443, "/a?x=1&y=2"), b"") is not None


def test_ignored_parameters():
    r = Replay([rec("/a?x=1&t=100&y=2")], ignore_params=["t"])
    assert r.match(req("/a?x=1&t=999&y=2"), b"") is not None
    assert r.match(req("/a?x=1&y=2"), b"") is not None
    assert r.match(req("/a?x=2&y=2"), b"") is None


def test_body_matches_when_recorded_unless_ignored():
    entries = [rec("/p", 200, "POST", body=b"one", source="1"),
               rec("/p", 201, "POST", body=b"two", source="2")]
    r = Replay(entries)
    assert r.match(req("/p", "POST"), b"two").source == "2"
    assert r.match(req("/p", "POST"), b"one").source == "1"
    assert r.match(req("/p", "POST"), b"three") is None
    # an entry without a recorded body (a HAR without postData) matches any body
    assert Replay([rec("/p", method="POST", body=None)]).match(req("/p", "POST"), b"x")
    r = Replay(entries, ignore_body=True)
    assert [r.match(req("/p", "POST"), b"x").source for _ in range(3)] == ["1", "2", "2"]


def test_unservable_entries_never_match():
    r = Replay([rec("/a", problem="cut")])
    assert r.match(req("/a"), b"") is None and not r.serves("app.test", 443)


def test_closest_are_the_hosts_own_and_most_alike_first():
    r = Replay([rec("/api/users/1"), rec("/api/users/2", method="POST"), rec("/static/x.css"),
                rec("/api/users"), rec("/api/users/1", host="cdn.test"), rec("/api/users/1")])
    close = r.closest(req("/api/users/3"))
    assert [c.request.path for c in close] == ["/api/users/1", "/api/users", "/static/x.css"]
    assert all(c.request.host == "app.test" for c in close)
    message = r.miss_message(req("/api/users/3"))
    assert message.startswith("not in the replay files: GET https://app.test:443/api/users/3;")
    assert "closest recorded: GET https://app.test:443/api/users/1 (cap:1)" in message
    assert "nothing recorded for other.test:443" in r.miss_message(req("/", host="other.test"))


def test_response_headers_recompute_framing_and_hop_by_hop():
    r = rec("/", headers=[(b"content-type", b"text/plain"), (b"content-length", b"99"),
                          (b"transfer-encoding", b"chunked"), (b"connection", b"x-hop"),
                          (b"x-hop", b"1"), (b"keep-alive", b"5"), (b"set-cookie", b"a=1"),
                          (b"set-cookie", b"b=2")])
    assert response_headers(r, "GET", 5) == [
        (b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"),
        (b"content-length", b"5")]
    assert (b"content-length", b"99") in response_headers(r, "HEAD", 0)
    assert (b"content-length", b"0") not in response_headers(rec("/", 304), "GET", 0)


# --- reading files ------------------------------------------------------------------------


def response_line(url: str, body: bytes, status: int = 200, method: str = "GET",
                  **extra) -> dict:
    ev = {"ts": 1.0, "event": "response", "conn": 1, "client": "127.0.0.1:1", "flow": 1,
          "method": method, "url": url, "http_version": "HTTP/1.1", "status": status,
          "reason": "OK", "headers": {"content-type": "text/plain"}, "request_bytes": 0,
          "response_bytes": len(body), "duration_ms": 1.0, "server": 1, "request_body": ""}
    try:
        ev["response_body"] = body.decode()
    except UnicodeDecodeError:
        ev["response_body"] = base64.b64encode(body).decode()
        ev["response_body_encoding"] = "base64"
    ev.update(extra)
    return ev


def write_capture(path: Path, events: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def test_capture_index_and_bodies_read_on_demand(tmp_path):
    cap = write_capture(tmp_path / "cap.jsonl", [
        {"ts": 1.0, "event": "listening"},
        response_line("https://app.test/a", b"text"),
        response_line("https://app.test/b", b"\xff\x00binary"),
        response_line("https://app.test/c", b"cut", response_body_truncated=True),
        response_line("https://app.test/d", b"x", headers={"set-cookie": "<redacted>",
                                                            "x-a": "1"}),
        {k: v for k, v in response_line("https://app.test/e", b"").items()
         if k != "response_body"},
    ])
    entries = read_file(str(cap))
    assert [e.source for e in entries] == [f"{cap}:{n}" for n in (2, 3, 4, 5, 6)]
    assert [read_body(e) for e in entries[:2]] == [b"text", b"\xff\x00binary"]
    assert all(isinstance(e.where, tuple) for e in entries)  # an offset, not the body
    assert [e.problem is None for e in entries] == [True, True, False, True, False]
    assert "--record-for-replay" in entries[2].problem
    assert entries[3].headers == [(b"x-a", b"1")] and "redacted" in entries[3].warning


def test_capture_with_a_first_line_longer_than_the_sniffed_bytes(tmp_path):
    body = bytes(range(256)) * 64  # base64: a first line far over 4 KiB
    cap = write_capture(tmp_path / "cap.jsonl", [response_line("https://app.test/", body)])
    [entry] = read_file(str(cap))
    assert read_body(entry) == body and entry.source == f"{cap}:1"


def chromium_har() -> bytes:
    """An export in Chromium DevTools' shape: `_`-prefixed fields, base64 bodies, HTTP/2
    entries with pseudo-headers and the "h2" version, a POST with postData."""
    def entry(method, url, status, headers, content, version="h2", post=None):
        request = {"method": method, "url": url, "httpVersion": version,
                   "headers": [{"name": ":authority", "value": "app.test"},
                               {"name": ":method", "value": method}],
                   "queryString": [], "cookies": [], "headersSize": -1, "bodySize": 0}
        if post is not None:
            request["postData"] = post
        return {"_initiator": {"type": "other"}, "_priority": "VeryHigh",
                "_resourceType": "document", "cache": {}, "connection": "12",
                "pageref": "page_1", "request": request,
                "response": {"status": status, "statusText": "", "httpVersion": version,
                             "headers": headers, "cookies": [], "content": content,
                             "redirectURL": "", "headersSize": -1, "bodySize": -1,
                             "_transferSize": 512, "_error": None},
                "serverIPAddress": "127.0.0.1", "startedDateTime": "2026-01-01T00:00:00Z",
                "time": 1.5, "timings": {"blocked": 0.1, "dns": -1, "ssl": -1, "connect": -1,
                                         "send": 0.1, "wait": 1, "receive": 0.3,
                                         "_blocked_queueing": 0.1}}
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    return orjson.dumps({"log": {"version": "1.2", "creator": {
        "name": "WebInspector", "version": "537.36"}, "pages": [], "entries": [
        entry("GET", "https://app.test/", 200, [{"name": ":status", "value": "200"},
                                                {"name": "content-type", "value": "text/html"}],
              {"size": 14, "mimeType": "text/html", "text": "<p>replay</p>\n"}),
        entry("GET", "https://app.test/logo.png", 200,
              [{"name": "content-type", "value": "image/png"}],
              {"size": len(png), "mimeType": "image/png", "compression": 0,
               "text": base64.b64encode(png).decode(), "encoding": "base64"}),
        entry("POST", "https://app.test/api?x=1", 201,
              [{"name": "content-type", "value": "application/json"}],
              {"size": 11, "mimeType": "application/json", "text": '{"ok":true}'},
              post={"mimeType": "application/json", "text": '{"a":1}'}),
        entry("GET", "https://app.test/gone", 0, [], {"size": 0, "mimeType": "x-unknown"},
              version=""),
        # a compressed response: Chromium exports the body decoded
        entry("GET", "https://app.test/app.js", 200,
              [{"name": "content-type", "value": "text/javascript"},
               {"name": "content-encoding", "value": "br"}],
              {"size": 17, "mimeType": "text/javascript", "compression": 5,
               "text": "window.APP = 1;\n"}),
    ]}}, option=orjson.OPT_INDENT_2)


def test_chromium_har_entries(tmp_path):
    har = tmp_path / "chromium.har"
    har.write_bytes(chromium_har())
    entries = read_file(str(har))
    assert [e.source for e in entries] == [f"{har}#entry {i}" for i in (1, 2, 3, 4, 5)]
    assert read_body(entries[1]).startswith(b"\x89PNG") and len(read_body(entries[1])) == 264
    assert entries[0].headers == [(b"content-type", b"text/html")]  # no pseudo-headers
    assert entries[2].body == body_digest(b'{"a":1}')
    assert [e.problem is None for e in entries] == [True, True, True, False, True]
    assert entries[4].headers == [(b"content-type", b"text/javascript")]  # body decoded


def test_our_own_har_replays_like_its_capture(tmp_path):
    cap = write_capture(tmp_path / "cap.jsonl", [
        {"ts": 1.0, "event": "request", "conn": 1, "client": "127.0.0.1:1", "flow": 1,
         "method": "POST", "url": "https://app.test/p", "scheme": "https", "host": "app.test",
         "port": 443, "path": "/p", "http_version": "HTTP/1.1", "headers": {}},
        response_line("https://app.test/p", b"\xff\xfe", method="POST",
                      request_body=base64.b64encode(b"\xff").decode(),
                      request_body_encoding="base64", request_bytes=1,
                      headers={"content-type": "text/plain", "content-encoding": "gzip"})])
    har = tmp_path / "ours.har"
    r = run_cli("har", str(cap))
    assert r.returncode == 0, r.stderr
    har.write_bytes(r.stdout)
    [from_cap], [from_har] = read_file(str(cap)), read_file(str(har))
    assert from_har.body == from_cap.body == body_digest(b"\xff")
    assert read_body(from_har) == read_body(from_cap) == b"\xff\xfe"
    assert from_har.request == from_cap.request and from_har.status == 200
    # ours holds bodies as sent: their content-encoding stays
    assert from_har.headers == from_cap.headers == [(b"content-type", b"text/plain"),
                                                    (b"content-encoding", b"gzip")]


MALFORMED = [
    # (file name, content, the error's start)
    ("cap.jsonl", b'{"event":"listening"}\n{"event":"response"\n', "cap.jsonl:2: not a JSON"),
    ("cap.jsonl", b'{"event":"listening"}\n\n[1]\n', "cap.jsonl:3: not a dumpproxy event"),
    ("cap.jsonl", b'{"event":"response","url":"nope","method":"GET","status":200,'
                  b'"headers":{}}\n', "cap.jsonl:1: a response event without a valid"),
    ("cap.jsonl", b'{"event":"listening"}\n', "cap.jsonl: no response events"),
    ("cap.jsonl", b'{"event":"listening"}\n{"event":"x"}', "cap.jsonl:2: incomplete last"),
    ("notes.txt", b"hello\nworld\n", "notes.txt:1: not a JSON line"),
    ("page.har", b'{\n  "log": {\n    "entries": [\n  }\n', "page.har:4: neither a dumpproxy "
                                                            "capture nor a HAR file (not JSON"),
    ("page.har", b'{"log": {"entries": [{"request": {}}]}}', "page.har#entry 1: not a HAR"),
    ("other.json", b'{"name": "x"}\n', "other.json:1: neither a dumpproxy capture nor a HAR"),
    ("empty.har", b'{"log": {"entries": []}}', "empty.har: a HAR file without entries"),
]


@pytest.mark.parametrize("name,content,error", MALFORMED)
def test_malformed_or_foreign_replay_files_are_one_line_naming_file_and_line(
        tmp_path, home, name, content, error):
    path = tmp_path / name
    path.write_bytes(content)
    for args in (["--replay", str(path)], ["replay", "--list", str(path)]):
        r = run_cli(*args, home=home)
        assert r.returncode == 2, r
        assert r.stdout == b""
        lines = r.stderr.decode().splitlines()
        assert lines == [f"dumpproxy: error: {tmp_path}/{error}" + lines[0].split(error)[1]]


def test_missing_file_and_stdin_are_refused(tmp_path, home):
    r = run_cli("--replay", str(tmp_path / "none.jsonl"), home=home)
    assert r.returncode == 2 and r.stderr.decode().startswith(
        f"dumpproxy: error: {tmp_path}/none.jsonl: No such file")
    r = run_cli("--replay", "-", home=home)
    assert r.returncode == 2 and b"not standard input" in r.stderr
    r = run_cli("--replay-miss", "forward", home=home)
    assert r.returncode == 2 and r.stderr == (
        b"dumpproxy: error: --replay-miss is for replay: dumpproxy --replay FILE "
        b"--replay-miss ...\n")


def test_replay_list(tmp_path, home):
    cap = write_capture(tmp_path / "cap.jsonl", [
        response_line("https://app.test/a", b"text"),
        response_line("http://app.test:8080/c?q=1", b"cut", status=404,
                      response_body_truncated=True)])
    har = tmp_path / "chromium.har"
    har.write_bytes(chromium_har())
    r = run_cli("replay", "--list", str(cap), str(har), home=home)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[:3] == [
        f"{cap}:1 GET https://app.test:443/a 200 replayable",
        f"{cap}:2 GET http://app.test:8080/c?q=1 404 not replayable: its body was cut at "
        "--max-body-bytes (record with --record-for-replay)",
        f"{har}#entry 1 GET https://app.test:443/ 200 replayable"]
    assert lines[-2].startswith(f"{har}#entry 4 GET https://app.test:443/gone 0 not "
                                "replayable") and len(lines) == 7


def test_entries_that_cannot_be_served_are_named_at_start_up(home, tmp_path):
    cap = write_capture(tmp_path / "cap.jsonl", [
        response_line("https://app.test/a", b"text"),
        response_line("https://app.test/c", b"cut", response_body_truncated=True),
        response_line("https://app.test/d", b"x", headers={"set-cookie": "<redacted>"})])
    p = DumpProxy(["-p", "0", "--replay", str(cap)], home)  # not -q: it silences them
    p.stop()
    lines = [line for line in p.stderr.decode().splitlines() if "warning" in line]
    assert lines == [
        f"dumpproxy: warning: {cap}:2: GET https://app.test:443/c: not replayed: its body "
        "was cut at --max-body-bytes (record with --record-for-replay)",
        f"dumpproxy: warning: {cap}:3: GET https://app.test:443/d: served without its "
        "credential headers (redacted when recorded; --no-redact keeps them)"]


# --- untrusted input: no internal error on any file -----------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["event", "log", "entries", "request", "response", "url", "method",
                         "status", "headers", "name", "value", "content", "text", "encoding",
                         "postData", "response_body", "request_body", "_encoding",
                         "response_body_encoding", "comment", "aborted", "server", "x"])
        | st.text(max_size=5), inner, max_size=6),
    max_leaves=20)
EVENTISH = st.fixed_dictionaries({"event": st.just("response"), "url": st.sampled_from(
    ["https://app.test/a", "http://[::1]:80/", "ftp://x/", "https://a:99999/", 1]),
    "method": st.sampled_from(["GET", "", 3]), "status": st.sampled_from([200, 0, 101, "x"]),
    "headers": JSON}, optional={"response_body": JSON, "request_body": JSON,
                                "request_body_encoding": st.just("base64"),
                                "response_body_encoding": st.just("base64"),
                                "server": JSON, "aborted": JSON})


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(st.one_of(EVENTISH, JSON), min_size=1, max_size=4).map(
        lambda evs: b"".join(json.dumps(e).encode() + b"\n" for e in evs)),
    st.lists(st.fixed_dictionaries({"request": JSON, "response": JSON}), max_size=3).map(
        lambda es: json.dumps({"log": {"entries": es}}).encode())))
def test_readers_take_any_input_without_an_internal_error(tmp_path, data):
    path = tmp_path / "input"
    path.write_bytes(data)
    try:
        entries = read_file(str(path))
    except ReplayFileError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        return
    for entry in entries:
        if entry.problem is None:
            assert isinstance(read_body(entry), bytes)


def test_har_reader_takes_our_har_schema_shape():
    """The HAR reader and `dumpproxy har` agree on the fields (content.encoding, postData
    with `_encoding`): a minimal valid document of each kind reads."""
    doc = {"log": {"entries": [{"request": {"method": "GET", "url": "https://a.test/"},
                                "response": {"status": 204, "headers": []}}]}}
    [entry] = har_entries("x.har", orjson.dumps(doc))
    assert entry.problem is None and entry.status == 204


def test_replay_subcommand_usage_errors_are_one_line(home, tmp_path):
    for args in ([], [str(tmp_path / "cap.jsonl")], ["--list"], ["--lits", "x"]):
        r = run_cli("replay", *args, home=home)
        assert r.returncode == 2 and r.stdout == b"", (args, r)
        [line] = r.stderr.decode().splitlines()
        assert line.startswith("dumpproxy: error: replay: ") and line.endswith(
            "(dumpproxy replay --list FILE...)"), line
