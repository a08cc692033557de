"""`--format text` (SPEC §2): `format_text` line by line for every event kind (exact
strings, sizes in mitmdump's style), then one real run through curl checking the log.
"""

from __future__ import annotations

import re
import time

import pytest
from conftest import DumpProxy, Origin, curl

from dumpproxy.textformat import format_text, pretty_size

CLIENT = "127.0.0.1:57089"


def ev(kind: str, client: str | None = CLIENT, **fields) -> dict:
    """An event dict as the writer builds it: ts, event, conn/client, then fields."""
    e: dict = {"ts": 1795826143.793371, "event": kind}
    if client is not None:
        e["conn"] = 1
        e["client"] = client
    e.update(fields)
    return e


# --- unit: sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0b"),
        (6, "6b"),
        (1023, "1023b"),
        (1024, "1k"),
        (1260, "1.23k"),
        (1536, "1.5k"),
        (1024 * 1024 - 1, "1024k"),
        (1024 * 1024, "1m"),
        (int(2.25 * 1024 * 1024), "2.25m"),
        (5 * 1024**3, "5g"),
        (2 * 1024**4, "2t"),
        (2048 * 1024**4, "2048t"),
    ],
)
def test_pretty_size(n, text):
    assert pretty_size(n) == text


# --- unit: one line per event kind --------------------------------------------------------


def test_listening():
    e = ev("listening", client=None, address="127.0.0.1:8080", mode="regular",
           version="0.1.0", pid=42, ca_cert="/x/ca-cert.pem", schema=1)
    assert format_text(e) == "Proxy server listening at http://127.0.0.1:8080 (mode regular)\n"


def test_client_connect_and_disconnect():
    assert format_text(ev("client_connect")) == "127.0.0.1:57089: client connect\n"
    assert (format_text(ev("client_disconnect", duration_ms=12.5))
            == "127.0.0.1:57089: client disconnect\n")


def test_ipv6_client_prefix():
    e = ev("client_connect", client="[::1]:40000")
    assert format_text(e) == "[::1]:40000: client connect\n"


def test_server_connect_with_resolved_ip():
    e = ev("server_connect", address="example.com:443", ip="93.184.216.34:443",
           connect_ms=1.5)
    assert (format_text(e)
            == "127.0.0.1:57089: server connect example.com:443 (93.184.216.34:443)\n")


def test_server_connect_address_is_the_ip_has_no_parenthesis():
    e = ev("server_connect", address="93.184.216.34:443", ip="93.184.216.34:443",
           connect_ms=1.5)
    assert format_text(e) == "127.0.0.1:57089: server connect 93.184.216.34:443\n"
    e6 = ev("server_connect", address="[2001:db8::1]:443", ip="[2001:db8::1]:443",
            connect_ms=1.5)
    assert format_text(e6) == "127.0.0.1:57089: server connect [2001:db8::1]:443\n"


def test_server_disconnect():
    e = ev("server_disconnect", address="example.com:443", ip="93.184.216.34:443",
           bytes_sent=10, bytes_received=20)
    assert (format_text(e)
            == "127.0.0.1:57089: server disconnect example.com:443 (93.184.216.34:443)\n")
    same = dict(e, address="93.184.216.34:443")
    assert format_text(same) == "127.0.0.1:57089: server disconnect 93.184.216.34:443\n"


def test_decision_default():
    e = ev("decision", address="example.com:443", action="intercept", reason="default",
           pattern=None, source=None, matched=None,
           candidates=["93.184.216.34:443", "example.com:443"], sni="example.com")
    assert format_text(e) == "127.0.0.1:57089: intercept example.com:443 (default)\n"


def test_decision_with_pattern_shows_it_as_written():
    # the pattern as the user wrote it (one backslash), so it can be copied back into a file
    e = ev("decision", address="example.com:443", action="passthrough",
           reason="ignore_hosts", pattern=r"^example\.com:443$", source="ignore.txt:3",
           matched="example.com:443", candidates=["example.com:443"], sni=None)
    assert (format_text(e)
            == "127.0.0.1:57089: passthrough example.com:443 "
               "(ignore_hosts '^example\\.com:443$')\n")


def test_decision_allow_list_miss():
    e = ev("decision", address="news.example:443", action="passthrough",
           reason="allow_hosts", pattern=None, source=None, matched=None,
           candidates=["news.example:443"], sni=None)
    assert format_text(e) == "127.0.0.1:57089: passthrough news.example:443 (allow_hosts)\n"


def test_tls_and_request_print_nothing():
    tls = ev("tls", side="client", address="example.com:443", sni="example.com",
             alpn="h2", version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")
    assert format_text(tls) is None
    req = ev("request", flow=1, method="GET", url="https://example.com/", scheme="https",
             host="example.com", port=443, path="/", http_version="HTTP/2.0", headers={})
    assert format_text(req) is None


def response(**over) -> dict:
    fields = dict(flow=1, method="GET", url="https://example.com/", http_version="HTTP/2.0",
                  status=200, reason="OK", headers={}, request_bytes=0, response_bytes=1260,
                  duration_ms=3.2)
    fields.update(over)
    return ev("response", **fields)


def test_response_two_lines():
    assert format_text(response()) == (
        "127.0.0.1:57089: GET https://example.com/ HTTP/2.0\n"
        "     << HTTP/2.0 200 OK 1.23k\n"
    )


def test_response_small_body_and_http1():
    e = response(method="POST", url="http://127.0.0.1:8000/echo", http_version="HTTP/1.1",
                 status=404, reason="Not Found", response_bytes=7)
    assert format_text(e) == (
        "127.0.0.1:57089: POST http://127.0.0.1:8000/echo HTTP/1.1\n"
        "     << HTTP/1.1 404 Not Found 7b\n"
    )


def test_response_without_reason_phrase():
    e = response(status=599, reason="", response_bytes=0)
    assert format_text(e) == (
        "127.0.0.1:57089: GET https://example.com/ HTTP/2.0\n"
        "     << HTTP/2.0 599 0b\n"
    )


def test_error_with_address():
    e = ev("error", stage="server_connect",
           message="cannot connect to 127.0.0.1:1: Connection refused", address="127.0.0.1:1")
    assert format_text(e) == ("127.0.0.1:57089: error (server_connect) 127.0.0.1:1: "
                              "cannot connect to 127.0.0.1:1: Connection refused\n")


def test_tls_failure_is_an_error_line():
    e = ev("error", stage="client_tls", message="client rejected the certificate",
           address="example.com:443")
    assert format_text(e) == ("127.0.0.1:57089: error (client_tls) example.com:443: "
                              "client rejected the certificate\n")


def test_error_without_address_or_client():
    e = ev("error", client=None, stage="reload", message="ignore.txt:3: invalid pattern")
    assert format_text(e) == "error (reload): ignore.txt:3: invalid pattern\n"


def test_shutdown():
    e = ev("shutdown", client=None, reason="SIGTERM", connections=3, requests=5,
           passthrough=1, errors=0, uptime_s=1.5)
    assert format_text(e) == (
        "shutdown (SIGTERM): 3 connections, 5 requests, 1 passed through, 0 errors\n"
    )


def test_unknown_event_prints_nothing():
    assert format_text(ev("something_new", x=1)) is None


# --- end to end ---------------------------------------------------------------------------


def wait_text(p: DumpProxy, pred, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with p._cond:
            hits = [line for line in p.lines if pred(line)]
        if hits:
            return hits[0]
        assert p.proc.poll() is None, p.stderr.decode(errors="replace")
        time.sleep(0.05)
    raise AssertionError("line not seen; so far:\n" + "".join(p.lines))


def test_text_format_end_to_end(home, origin, tls_origin, pki):
    """Plain HTTP by IP, HTTPS by name (intercepted), a passthrough, a TLS failure."""
    other = Origin(pki.server_context(["127.0.0.1"]))  # the one passed through
    try:
        run_text_format(home, origin, tls_origin, other, pki)
    finally:
        other.close()


def run_text_format(home, origin, tls_origin, other, pki):
    passthrough = rf"^127\.0\.0\.1:{other.port}$"
    p = DumpProxy(["-p", "0", "-q", "--format", "text", "--upstream-ca", str(pki.ca_path),
                   "--ignore-hosts", passthrough], home, wait_listening=False)
    try:
        first = wait_text(p, lambda line: "listening" in line)
        m = re.fullmatch(r"Proxy server listening at http://127\.0\.0\.1:(\d+) \(mode regular\)\n",
                         first)
        assert m, first
        proxy = f"http://127.0.0.1:{m[1]}"
        ca = home / "ca-cert.pem"

        def run(*args: str, ok: bool = True) -> str:
            r = curl("-x", proxy, "-w", "|%{local_port}", *args)
            assert (r.returncode == 0) == ok, r.stderr
            return f"127.0.0.1:{r.stdout.decode().rpartition('|')[2]}"

        c1 = run(origin.url("/small"))
        c2 = run("--cacert", str(ca), tls_origin.url("/status/404", host="localhost"))
        c3 = run("--cacert", str(pki.ca_path), other.url("/small"))
        # curl rejects dumpproxy's certificate: a TLS failure
        c4 = run(tls_origin.url("/small", host="localhost"), ok=False)
        for c in (c1, c2, c3, c4):
            wait_text(p, lambda line, c=c: line == f"{c}: client disconnect\n")
    finally:
        assert p.stop() == 0
    text = "".join(p.lines)
    assert "\x1b" not in text and "\x1b" not in p.stderr.decode(errors="replace")
    assert not any(line.lstrip().startswith("{") for line in p.lines), text
    plain = f"127.0.0.1:{origin.port}"
    tls_ip = f"127.0.0.1:{tls_origin.port}"
    other_ip = f"127.0.0.1:{other.port}"
    tls_name = f"localhost:{tls_origin.port}"
    expected_in_order = {
        c1: [f"{c1}: client connect\n",
             f"{c1}: server connect {plain}\n",
             f"{c1}: intercept {plain} (default)\n",
             f"{c1}: GET http://{plain}/small HTTP/1.1\n     << HTTP/1.1 200 OK 6b\n",
             f"{c1}: client disconnect\n"],
        c2: [f"{c2}: client connect\n",
             f"{c2}: server connect {tls_name} ({tls_ip})\n",
             f"{c2}: intercept {tls_name} (default)\n",
             f"{c2}: GET https://{tls_name}/status/404 HTTP/1.1\n"
             "     << HTTP/1.1 404 Not Found 7b\n",
             f"{c2}: client disconnect\n"],
        c3: [f"{c3}: client connect\n",
             f"{c3}: server connect {other_ip}\n",
             f"{c3}: passthrough {other_ip} (ignore_hosts '{passthrough}')\n",
             f"{c3}: client disconnect\n"],
        c4: [f"{c4}: client connect\n",
             f"{c4}: intercept {tls_name} (default)\n",
             f"{c4}: error (client_tls)",
             f"{c4}: client disconnect\n"],
    }
    for lines in expected_in_order.values():
        pos = 0
        for line in lines:
            i = text.find(line, pos)
            assert i >= 0, f"missing or out of order: {line!r} in\n{text}"
            pos = i + len(line)
    # c2's upstream connection waited in the pool (c4 took it and gave it back): closed at
    # shutdown, on the line of the client connection that had it last
    assert f"{c4}: server disconnect {tls_name} ({tls_ip})\n" in p.lines
    assert f"{c3}: server disconnect {other_ip}\n" in p.lines
    # nothing of the passthrough tunnel but connection lines and its decision
    assert not any(line.startswith(f"{c3}: GET") for line in p.lines)
    # every line is client-prefixed, the response's second line, or a proxy-level line
    for line in p.lines:
        assert (re.match(r"127\.0\.0\.1:\d+: \S", line) or line.startswith("     << ")
                or line.startswith(("Proxy server listening", "shutdown ("))), line
    assert p.lines[0] == first
    assert re.fullmatch(r"shutdown \(SIGTERM\): 4 connections, 2 requests, "
                        r"1 passed through, 1 errors\n", p.lines[-1]), p.lines[-1]
