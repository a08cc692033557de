"""What a person sees on stderr: every `error` event is also one line there by default
(SPEC §9.5), so that `dumpproxy | jq 'select(.event=="response")'` still shows why a
client failed; `-q` silences those lines. stdout carries events only."""

from __future__ import annotations

import socket

from conftest import DumpProxy, curl, parse_events, run_cli

from dumpproxy.textformat import error_line, format_text


def test_wrap_mode_error_reaches_stderr_while_stdout_is_filtered(home, refused_port):
    port = refused_port
    r = run_cli("--", "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/x", home=home)
    assert r.returncode == 0, r.stderr
    events = parse_events(r.stdout)
    (err,) = [e for e in events if e["event"] == "error"]
    assert r.stderr.decode() == (
        f"dumpproxy: {err['client']}: error (server_connect) 127.0.0.1:{port}: "
        f"cannot connect to 127.0.0.1:{port}: Connection refused\n")


def test_every_error_event_is_one_stderr_line(home, refused_port):
    port = refused_port
    p = DumpProxy(["-p", "0"], home)
    try:
        r = curl("-x", p.url, "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{port}/")
        assert r.stdout == b"502"
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400 ")
        p.wait_for(lambda e: e["event"] == "error", count=2)
    finally:
        assert p.stop() == 0
    errors = p.of("error")
    assert [e["stage"] for e in errors] == ["server_connect", "http"]
    lines = p.stderr.decode().splitlines()
    assert lines[0] == f"dumpproxy: listening on http://127.0.0.1:{p.port}"
    assert lines[1:] == [error_line(e).rstrip("\n") for e in errors]
    assert lines[2] == f"dumpproxy: {errors[1]['client']}: error (http): {errors[1]['message']}"


def test_quiet_silences_error_lines(home, refused_port):
    port = refused_port
    r = run_cli("-q", "--", "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/x",
                home=home)
    assert r.returncode == 0 and r.stderr == b""
    assert [e["stage"] for e in parse_events(r.stdout) if e["event"] == "error"] == [
        "server_connect"]


def test_error_line_is_one_line_whatever_the_message():
    ev = {"ts": 1.0, "event": "error", "conn": 3, "client": "127.0.0.1:5",
          "stage": "upstream", "message": "bad\nthing\r\nhere", "address": "a.test:443"}
    assert error_line(ev) == ("dumpproxy: 127.0.0.1:5: error (upstream) a.test:443: "
                              "bad thing here\n")
    assert format_text(ev) == error_line(ev).removeprefix("dumpproxy: ")
    no_conn = {"ts": 1.0, "event": "error", "stage": "reload", "message": "x.txt: gone"}
    assert error_line(no_conn) == "dumpproxy: error (reload): x.txt: gone\n"
