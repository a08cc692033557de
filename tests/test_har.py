"""`dumpproxy har`: captures made by a real dumpproxy with real clients (HTTP/1, HTTPS,
HTTP/2, passthrough, WebSocket, failures) convert to HAR 1.2 that validates against the
HAR 1.2 JSON Schema (tests/data/har-1.2.schema.json) and opens in haralyzer; plus fast
unit tests of the pure conversion."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT, DumpProxy, Origin, curl, run_cli
from haralyzer import HarEntry, HarParser
from test_readme import bin_dir  # noqa: F401 (a fixture)

from dumpproxy.har import HarConverter, convert, ip_only

SCHEMA = json.loads((Path(__file__).parent / "data" / "har-1.2.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def capture_of(p: DumpProxy, path: Path) -> Path:
    """Stop the proxy and keep its whole event stream in a file."""
    assert p.stop() == 0
    path.write_text("".join(p.lines))
    return path


def har(*args: str, stdin: bytes | None = None) -> tuple[dict, str]:
    r = run_cli("har", *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    return json.loads(r.stdout), r.stderr.decode()


def check_har(doc: dict) -> list[HarEntry]:
    """Valid against the schema and readable by haralyzer; the entries as haralyzer sees them."""
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    parser = HarParser(doc)
    assert parser.version == "1.2" and parser.creator["name"] == "dumpproxy"
    assert doc["log"]["pages"] == []
    pages = parser.pages
    entries = [e for page in pages for e in page.entries]
    assert len(entries) == len(doc["log"]["entries"])
    for e in entries:
        assert e.startTime is not None
        assert e.request.method and e.url.startswith(("http://", "https://"))
        # time is the sum of the timings that apply
        assert abs(sum(v for k, v in e.timings.items() if k != "comment" and v >= 0)
                   - e.time) < 0.01
    return entries


def events_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- captures from real traffic --------------------------------------------------------------


def test_http1_capture_with_bodies(dumpproxy, origin, tls_origin, pki, home, tmp_path):
    p = dumpproxy("--bodies", "--max-body-bytes", "200", "--no-redact",
                  "--upstream-ca", str(pki.ca_path))
    ca = str(home / "ca-cert.pem")
    for args in (
        [origin.url("/small")],
        ["--data-binary", "a=1&b=two", origin.url("/echo?x=1&y=")],
        [origin.url("/binary/300")],
        [origin.url("/cookies")],
        [origin.url("/status/404")],
        ["--cacert", ca, tls_origin.url("/small", host="localhost")],
    ):
        r = curl("-x", p.url, "-o", "/dev/null", *args)
        assert r.returncode == 0, r.stderr
    cap = capture_of(p, tmp_path / "cap.jsonl")
    events = events_of(cap)
    doc, err = har(str(cap))
    assert err == ""
    entries = check_har(doc)
    raw = doc["log"]["entries"]
    responses = [e for e in events if e["event"] == "response"]
    assert [(e["request"]["url"], e["response"]["status"]) for e in raw] == [
        (r["url"], r["status"]) for r in responses]
    assert [e.status for e in entries] == [200, 200, 200, 200, 404, 200]

    small, echo, binary, cookies, _missing, tls = raw
    req_ev = next(e for e in events if e["event"] == "request" and e["flow"] == 1)
    assert small["startedDateTime"].endswith("+00:00")
    assert small["request"]["headers"] == [{"name": k, "value": v}
                                           for k, v in req_ev["headers"].items()]
    assert small["response"]["httpVersion"] == "HTTP/1.1"
    assert small["response"]["content"] == {"size": 6, "mimeType": "text/plain",
                                            "text": "hello\n"}
    assert small["serverIPAddress"] == "127.0.0.1"
    resp_ev = next(e for e in events if e["event"] == "response" and e["flow"] == req_ev["flow"])
    assert small["connection"] == str(resp_ev["server"])  # the upstream connection
    # the first exchange of a plain-HTTP connection includes its upstream connect
    sc = next(e for e in events if e["event"] == "server_connect" and e["conn"] == req_ev["conn"])
    assert small["timings"]["connect"] == sc["connect_ms"]

    assert echo["request"]["method"] == "POST"
    assert echo["request"]["queryString"] == [{"name": "x", "value": "1"},
                                              {"name": "y", "value": ""}]
    assert echo["request"]["postData"]["text"] == "a=1&b=two"
    assert echo["request"]["postData"]["mimeType"] == "application/x-www-form-urlencoded"
    assert echo["request"]["bodySize"] == 9

    content = binary["response"]["content"]
    assert content["encoding"] == "base64" and "truncated" in content["comment"]
    assert base64.b64decode(content["text"]) == bytes(range(200))
    assert content["size"] == 300

    assert {(c["name"], c["value"]) for c in cookies["response"]["cookies"]} == {
        ("a", "1"), ("b", "2")}
    assert [h["value"] for h in cookies["response"]["headers"] if h["name"] == "set-cookie"
            ] == ["a=1", "b=2"]

    assert tls["request"]["url"] == tls_origin.url("/small", host="localhost")
    assert tls["serverIPAddress"] == "127.0.0.1"
    # a CONNECT tunnel connects upstream before the request: not part of the exchange
    assert tls["timings"]["connect"] == -1
    assert doc["log"]["comment"].startswith("converted by dumpproxy har: 6 entries (0 failed)")


@pytest.fixture(scope="module")
def h2_origin(pki) -> Iterator:
    from test_http2 import Hypercorn

    cert, key = pki.leaf(["localhost", "127.0.0.1"])
    o = Hypercorn(cert, key)
    yield o
    o.close()


def test_http2_capture(dumpproxy, pki, h2_origin, home, tmp_path):
    p = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = str(home / "ca-cert.pem")
    r = curl("--http2", "-x", p.url, "--cacert", ca, "-o", "/dev/null", "-o", "/dev/null",
             h2_origin.url("/small"), h2_origin.url("/echo?q=1"))
    assert r.returncode == 0, r.stderr
    cap = capture_of(p, tmp_path / "h2.jsonl")
    doc, _ = har(str(cap))
    entries = check_har(doc)
    assert [(e.request.method, e.status, e.response.httpVersion) for e in entries] == [
        ("GET", 200, "HTTP/2"), ("GET", 200, "HTTP/2")]  # as Firefox writes it
    raw = doc["log"]["entries"]
    assert [e["request"]["url"] for e in raw] == [h2_origin.url("/small"),
                                                  h2_origin.url("/echo?q=1")]
    assert raw[1]["request"]["queryString"] == [{"name": "q", "value": "1"}]
    assert not any(h["name"].startswith(":") for e in raw for h in e["request"]["headers"])
    assert {e["connection"] for e in raw} == {raw[0]["connection"]}  # one connection
    assert raw[0]["serverIPAddress"] == "127.0.0.1"


def test_passthrough_capture_has_no_entries(dumpproxy, pki, tls_origin, tmp_path):
    p = dumpproxy("--ignore-hosts", f":{tls_origin.port}$")
    r = curl("-x", p.url, "--cacert", str(pki.ca_path), "-o", "/dev/null",
             tls_origin.url("/small", host="localhost"))
    assert r.returncode == 0, r.stderr
    cap = capture_of(p, tmp_path / "pass.jsonl")
    assert any(e["event"] == "decision" and e["action"] == "passthrough"
               for e in events_of(cap))
    doc, _ = har(str(cap))
    assert check_har(doc) == []
    assert doc["log"]["entries"] == [] and doc["log"]["pages"] == []
    assert HarParser(doc).pages == []


def test_websocket_capture(dumpproxy, origin, tmp_path):
    p = dumpproxy()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(f"GET {origin.url('/ws')} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        s.sendall(b"ping")
        got = head.partition(b"\r\n\r\n")[2]
        while len(got) < 4:
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        assert got == b"ping"
    p.wait_for(lambda e: e["event"] == "client_disconnect")
    cap = capture_of(p, tmp_path / "ws.jsonl")
    doc, _ = har(str(cap))
    (entry,) = check_har(doc)
    assert entry.status == 101
    assert entry.response.statusText == "Switching Protocols"
    assert entry.request.get_header_value("upgrade") == "websocket"
    assert "comment" not in doc["log"]["entries"][0]


@pytest.fixture
def closing_origin() -> Iterator[int]:
    """Reads a request head, then closes without answering."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            with c:
                c.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    done.set()
    t.join(5)
    srv.close()


def test_failed_exchanges(dumpproxy, origin, closing_origin, tmp_path):
    p = dumpproxy()
    r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}",
             f"http://127.0.0.1:{closing_origin}/gone")
    assert r.stdout == b"502", r
    closed = Origin()  # nothing listening there: dumpproxy answers 502 itself
    port = closed.port
    closed.close()
    r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/")
    assert r.stdout == b"502", r
    assert curl("-x", p.url, "-o", "/dev/null", origin.url("/small")).returncode == 0
    cap = capture_of(p, tmp_path / "err.jsonl")
    events = events_of(cap)
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 2 and all(e.get("flow") for e in errors)
    doc, _ = har(str(cap))
    entries = check_har(doc)
    # every exchange is an entry, with the status the client got and the error as comment
    assert [e.status for e in entries] == [502, 502, 200]
    for entry, err, url in zip(doc["log"]["entries"], errors, (
            f"http://127.0.0.1:{closing_origin}/gone", f"http://127.0.0.1:{port}/"),
            strict=False):
        assert entry["request"]["url"] == url
        assert entry["comment"] == f"{err['stage']}: {err['message']}"
        assert entry["response"]["_error"] == entry["comment"]
        assert entry["_flow"] == err["flow"]
    assert doc["log"]["entries"][0]["serverIPAddress"] == "127.0.0.1"
    assert "comment" not in doc["log"]["entries"][2]
    assert doc["log"]["comment"].startswith("converted by dumpproxy har: 3 entries (2 failed)")


def test_cut_off_capture_and_split_files(dumpproxy, origin, tmp_path):
    """Several files read as one stream (a request in one, its response in the next), and a
    capture cut off mid-line: the open exchange is written as failed."""
    p = dumpproxy()
    for path in ("/small", "/status/201", "/status/404"):
        assert curl("-x", p.url, "-o", "/dev/null", origin.url(path)).returncode == 0
    lines = capture_of(p, tmp_path / "all.jsonl").read_text().splitlines(keepends=True)
    whole, _ = har(str(tmp_path / "all.jsonl"))
    assert [e["response"]["status"] for e in whole["log"]["entries"]] == [200, 201, 404]

    req2 = next(i for i, line in enumerate(lines)
                if '"event":"request"' in line and '"flow":2' in line)
    (tmp_path / "a.jsonl").write_text("".join(lines[: req2 + 1]))
    (tmp_path / "b.jsonl").write_text("".join(lines[req2 + 1 :]))
    split, err = har(str(tmp_path / "a.jsonl"), "-", stdin=(tmp_path / "b.jsonl").read_bytes())
    assert err == ""
    assert split == whole

    resp3 = next(i for i, line in enumerate(lines)
                 if '"event":"response"' in line and '"flow":3' in line)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:resp3]) + lines[resp3][:40])  # killed mid-write
    doc, err = har(str(cut))
    entries = check_har(doc)
    assert [e.status for e in entries] == [200, 201, 0]
    assert doc["log"]["entries"][2]["comment"] == "no response by the end of the capture"
    assert err == f"dumpproxy: warning: {cut}:{resp3 + 1}: incomplete last line, skipped\n"


def test_malformed_line_is_skipped_with_a_warning(dumpproxy, origin, tmp_path):
    p = dumpproxy()
    assert curl("-x", p.url, "-o", "/dev/null", origin.url("/small")).returncode == 0
    lines = capture_of(p, tmp_path / "c.jsonl").read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:2]) + "{not json\n" + "[1,2]\n" + "".join(lines[2:]))
    doc, err = har(str(bad))
    assert [e.status for e in check_har(doc)] == [200]
    assert err.splitlines() == [f"dumpproxy: warning: {bad}:3: not a JSON line, skipped",
                                f"dumpproxy: warning: {bad}:4: not a dumpproxy event, skipped"]
    assert doc["log"]["comment"].endswith("; 2 input lines skipped")


def test_warnings_are_capped_and_counted(tmp_path):
    junk = tmp_path / "junk.jsonl"  # junk, then one event: a (damaged) capture
    junk.write_text("x\n" * 8 + '{"ts":1.0,"event":"client_connect","conn":1,'
                    '"client":"127.0.0.1:5"}\n')
    doc, err = har(str(junk), str(junk))
    assert err.splitlines() == [
        *(f"dumpproxy: warning: {junk}:{n}: not a JSON line, skipped" for n in range(1, 9)),
        f"dumpproxy: warning: {junk}:1: not a JSON line, skipped",
        f"dumpproxy: warning: {junk}:2: not a JSON line, skipped",
        "dumpproxy: warning: more lines skipped (counted in the HAR's comment)"]
    assert check_har(doc) == []
    assert doc["log"]["comment"].endswith("; 16 input lines skipped")


def test_a_file_without_events_is_an_error_before_any_output(dumpproxy, origin, tmp_path):
    """`dumpproxy har traffic.har` (or a --format text capture) used to write an empty HAR
    and exit 0, unnoticed by a script: now one line naming the file, exit 2, no output."""
    p = dumpproxy()
    assert curl("-x", p.url, "-o", "/dev/null", origin.url("/small")).returncode == 0
    capture = capture_of(p, tmp_path / "c.jsonl")
    doc, _ = har(str(capture))
    as_har = tmp_path / "traffic.har"
    as_har.write_text(json.dumps(doc, indent=2) + "\n")
    one_line_har = tmp_path / "one-line.har"
    one_line_har.write_text(json.dumps(doc) + "\n")
    text = tmp_path / "text.log"
    r = run_cli("--format", "text", "-q", "-o", str(text), "--", "curl", "-s", "-o",
                "/dev/null", origin.url("/small"), home=p.home)
    assert r.returncode == 0, r.stderr
    assert text.read_text().startswith("Proxy server listening at ")
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n[2]\n')
    cases = {as_har: "a HAR document already?", one_line_har: "a HAR document already?",
             other: 'the JSON lines dumpproxy writes have an "event" field',
             text: "a --format text capture? only the JSON lines of the default --format "
                   "json convert"}
    for bad, why in cases.items():
        lines = len(bad.read_text().splitlines())
        for args in ([str(bad)], [str(capture), str(bad)], ["-"]):  # alone, second, stdin
            r = run_cli("har", *args, stdin=bad.read_bytes() if args == ["-"] else None)
            name = "-" if args == ["-"] else str(bad)
            assert (r.returncode, r.stdout) == (2, b""), r.stderr
            assert r.stderr.decode() == (f"dumpproxy: error: {name}: not a dumpproxy capture: "
                                         f"none of its {lines} lines is an event ({why})\n")


def test_bad_file_is_one_line_exit_2(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("")
    missing = tmp_path / "missing.jsonl"
    r = run_cli("har", str(good), str(missing))
    assert r.returncode == 2
    assert r.stdout == b""
    assert r.stderr.decode() == f"dumpproxy: error: {missing}: No such file or directory\n"
    r = run_cli("har", str(tmp_path))
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    assert str(tmp_path) in r.stderr.decode()
    r = run_cli("har", "-", "-")
    assert r.returncode == 2 and r.stderr.decode().count("\n") == 1
    r = run_cli("har", "--bogus")
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_help_and_empty_input():
    r = run_cli("har", "--help")
    assert r.returncode == 0 and r.stdout.startswith(b"usage: dumpproxy har")
    doc, err = har(stdin=b"")
    assert check_har(doc) == [] and err == ""


def test_entries_are_written_as_exchanges_complete(tmp_path):
    """Streaming: an entry is on stdout while the input is still open."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "dumpproxy", "har"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for ev in exchange(1, 1):
            proc.stdin.write(json.dumps(ev).encode() + b"\n")
        proc.stdin.flush()
        out = b""
        deadline = time.monotonic() + 15
        while b'"status":200' not in out:
            assert time.monotonic() < deadline, out
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, out
            out += chunk
        proc.stdin.close()
        out += proc.stdout.read()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(check_har(json.loads(out))) == 1


def test_reader_going_away_is_not_an_error(tmp_path):
    cap = tmp_path / "many.jsonl"
    with cap.open("w") as f:
        for i in range(1, 3001):
            for ev in exchange(i, i):
                f.write(json.dumps(ev) + "\n")
    r = subprocess.run(f"{sys.executable} -m dumpproxy har {cap} | head -c 100",
                       shell=True, cwd=ROOT, capture_output=True, timeout=60)
    assert len(r.stdout) == 100 and r.stderr == b""


# --- the pure conversion ------------------------------------------------------------------------


def exchange(conn: int, flow: int, ts: float = 1795826143.5, status: int = 200,
             **resp_extra) -> list[dict]:
    client = {"conn": conn, "client": "127.0.0.1:50000"}
    url = "http://example.com/p?a=1"
    return [
        {"ts": ts, "event": "client_connect", **client},
        {"ts": ts + 0.001, "event": "server_connect", **client, "address": "example.com:80",
         "ip": "93.184.216.34:80", "connect_ms": 1.0},
        {"ts": ts + 0.002, "event": "request", **client, "flow": flow, "method": "GET",
         "url": url, "scheme": "http", "host": "example.com", "port": 80, "path": "/p?a=1",
         "http_version": "HTTP/1.1", "headers": {"host": "example.com", "cookie": "s=1; t=2"}},
        {"ts": ts + 0.010, "event": "response", **client, "flow": flow, "method": "GET",
         "url": url, "http_version": "HTTP/1.1", "status": status, "reason": "OK",
         "headers": {"content-type": "text/plain", "location": "/next"},
         "request_bytes": 0, "response_bytes": 5, "duration_ms": 10.0, **resp_extra},
        {"ts": ts + 0.011, "event": "client_disconnect", **client, "duration_ms": 11.0},
    ]


def listening(pid: int = 1) -> dict:
    return {"ts": 1795826143.0, "event": "listening", "address": "127.0.0.1:8080",
            "pid": pid}


def test_unit_entry_fields():
    doc = convert([listening(), *exchange(1, 1)])
    assert not list(VALIDATOR.iter_errors(doc))
    (e,) = doc["log"]["entries"]
    assert e["startedDateTime"] == "2026-11-28T00:35:43.500+00:00"
    assert e["time"] == 10.0
    assert e["timings"] == {"blocked": -1, "dns": -1, "connect": 1.0, "ssl": -1, "send": 0,
                            "wait": 9.0, "receive": 0}
    assert e["serverIPAddress"] == "93.184.216.34" and e["connection"] == "1"
    assert e["request"]["cookies"] == [{"name": "s", "value": "1"}, {"name": "t", "value": "2"}]
    assert e["request"]["queryString"] == [{"name": "a", "value": "1"}]
    assert e["response"]["redirectURL"] == "/next"
    assert "postData" not in e["request"] and "text" not in e["response"]["content"]


def test_unit_runs_do_not_mix():
    """Two runs appended to one file reuse conn and flow numbers."""
    events = [listening(1), *exchange(1, 1)[:3],  # run 1 ends without its response
              listening(2), *exchange(1, 1, status=204)]
    entries = convert(events)["log"]["entries"]
    assert [(e["response"]["status"], e.get("comment")) for e in entries] == [
        (0, "the capture ended without a response"), (204, None)]
    # several listeners of one process: consecutive listening lines, one run
    conv = HarConverter()
    for ev in [listening(7), listening(7), *exchange(1, 1)[:3]]:
        assert conv.feed(ev) == []
    assert conv.run == 1 and len(conv.open) == 1


def test_unit_failures():
    ex = exchange(1, 1)
    err = {"ts": ex[2]["ts"] + 0.5, "event": "error", "conn": 1, "client": "x",
           "stage": "upstream", "message": "boom", "flow": 1, "address": "example.com:80"}
    entries = convert([listening(), *ex[:3], err, *ex[4:]])["log"]["entries"]
    assert entries[0]["comment"] == "upstream: boom"
    assert entries[0]["time"] == pytest.approx(500.0)
    # an error without a flow explains the exchanges its connection leaves open
    conn_err = {**err, "flow": None, "stage": "http2", "message": "protocol error"}
    del conn_err["flow"]
    entries = convert([listening(), *ex[:3], conn_err, *ex[4:]])["log"]["entries"]
    assert entries[0]["comment"] == "http2: protocol error"
    # an error after the response (an upgraded connection ending) adds nothing
    entries = convert([listening(), *ex[:4], err])["log"]["entries"]
    assert [e["response"]["status"] for e in entries] == [200]


def test_unit_response_without_its_request():
    """A rotated file's tail: the request is in the file before."""
    (e,) = convert(exchange(3, 9)[3:])["log"]["entries"]
    assert e["request"]["url"] == "http://example.com/p?a=1"
    assert e["request"]["comment"] == "the request event is not in the input"
    assert not list(VALIDATOR.iter_errors(convert(exchange(3, 9)[3:])))


def test_unit_bodies():
    body = base64.b64encode(b"\xff\x00").decode()
    (e,) = convert(exchange(1, 1, request_body="x=1", response_body=body,
                            response_body_encoding="base64", response_body_truncated=True,
                            request_bytes=3))["log"]["entries"]
    assert e["request"]["postData"] == {"mimeType": "", "text": "x=1"}
    c = e["response"]["content"]
    assert c["text"] == body and c["encoding"] == "base64"
    assert c["comment"].startswith("base64") and "truncated" in c["comment"]


def test_unit_memory_holds_only_open_exchanges():
    conv = HarConverter()
    conv.feed(listening())
    for i in range(1, 2001):
        for ev in exchange(i, i):
            conv.feed(ev)
        assert not conv.open and not conv.conns
    assert conv.entries == 2000


@pytest.mark.parametrize("address, ip", [("127.0.0.1:80", "127.0.0.1"),
                                         ("[2001:db8::1]:443", "2001:db8::1")])
def test_unit_ip_only(address, ip):
    assert ip_only(address) == ip


# --- the README's and the man page's examples -----------------------------------------------


def man_examples(section: str) -> list[str]:
    """The lines of the .EX blocks of a man page section, as printed."""
    from test_cli_docs import deroff, man_section

    out, inside = [], False
    for line in man_section(section):
        if line in (".EX", ".EE"):
            inside = line == ".EX"
        elif inside:
            out.append(deroff(line))
    return out


def test_example_har(tmp_path, bin_dir, dumpproxy, origin):  # noqa: F811
    """The README's HAR block, run for real."""
    run_har_examples(tmp_path, bin_dir, dumpproxy, origin, "readme")


def test_example_har_files(tmp_path, bin_dir, dumpproxy, origin):  # noqa: F811
    """The man page's HAR example, run for real."""
    run_har_examples(tmp_path, bin_dir, dumpproxy, origin, "man")


def run_har_examples(tmp_path, bin_dir, dumpproxy, origin, which: str) -> None:  # noqa: F811
    from test_readme import clean_env, marked_blocks, run_bash

    p = dumpproxy()
    for path in ("/small", "/status/404", "/echo"):
        assert curl("-x", p.url, "-o", "/dev/null", origin.url(path)).returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    lines = capture_of(p, work / "whole.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"event":"request"' in line
               and '"flow":2' in line) + 1
    (work / "traffic.jsonl.1").write_text("".join(lines[:cut]))
    (work / "traffic.jsonl").write_text("".join(lines[cut:]))
    suite = work / "run-suite.sh"
    suite.write_text('#!/bin/sh\ncurl -sS -o /dev/null "$ORIGIN_URL/small" && '
                     'curl -sS -o /dev/null "$ORIGIN_URL/missing"\n')
    suite.chmod(0o755)
    whole, _ = har(str(work / "whole.jsonl"))
    env = clean_env(tmp_path, bin_dir, ORIGIN_URL=f"http://127.0.0.1:{origin.port}")

    man = man_examples("HAR")
    assert man and all(line.startswith("dumpproxy har ") for line in man)
    scripts = {"readme": marked_blocks()["har"], "man": "\n".join(man) + "\n"}
    for name, script in ((which, scripts[which]),):
        (work / "traffic.har").unlink(missing_ok=True)
        (work / f"{name}.sh").write_text(script)
        r = run_bash(["-eu", "-o", "pipefail", f"{name}.sh"], cwd=work, env=env)
        assert r.returncode == 0, f"{name}:\n{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr and "warning" not in r.stderr, r.stderr
        doc = json.loads((work / "traffic.har").read_text())
        check_har(doc)
        assert doc == whole, name
    if which != "readme":
        return
    suite_har = json.loads((work / "suite.har").read_text())
    assert [(e.request.url, e.status) for e in check_har(suite_har)] == [
        (f"http://127.0.0.1:{origin.port}/small", 200),
        (f"http://127.0.0.1:{origin.port}/missing", 404)]


# --- shell completion of the subcommand ----------------------------------------------------

SHELLS = ["bash", "bash-without-bash-completion", "zsh", "fish"]


@pytest.mark.parametrize("shell", SHELLS)
def test_completes_the_har_subcommand_and_its_files(shell, tmp_path):
    from test_cli_docs import CHECKOUT, complete, names

    assert "har" in names(complete(CHECKOUT, shell, "dumpproxy h", tmp_path))
    (tmp_path / "traffic.jsonl").write_text("")
    (tmp_path / "tree").mkdir()
    got = names(complete(CHECKOUT, shell, f"dumpproxy har {tmp_path}/tr", tmp_path))
    assert {"traffic.jsonl", "tree"} <= got, got
    got = names(complete(CHECKOUT, shell, f"dumpproxy har {tmp_path}/traffic.jsonl {tmp_path}/tr",
                         tmp_path))
    assert {"traffic.jsonl", "tree"} <= got, got


@pytest.mark.parametrize("shell", ["bash", "bash-without-bash-completion", "fish"])
def test_no_proxy_options_after_har(shell, tmp_path):
    from test_cli_docs import CHECKOUT, complete, names

    assert "--ignore-hosts" not in names(complete(CHECKOUT, shell, "dumpproxy har --ig", tmp_path))
    assert "--ignore-hosts" in names(complete(CHECKOUT, shell, "dumpproxy --ig", tmp_path))
