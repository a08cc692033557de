"""`--mode` values (dumpproxy.modespec, pure) and their command-line errors."""

from __future__ import annotations

import pytest
from conftest import run_cli

from dumpproxy.modespec import ModeError, parse_mode


@pytest.mark.parametrize("value,kind,listen", [
    ("regular", "regular", (None, None)),
    ("socks5@1080", "socks5", (None, 1080)),
    ("transparent@127.0.0.1:8081", "transparent", ("127.0.0.1", 8081)),
    ("regular@[::1]:8080", "regular", ("::1", 8080)),
    ("socks5@0", "socks5", (None, 0)),
])
def test_plain_modes_and_listen_suffix(value, kind, listen):
    spec = parse_mode(value)
    assert spec.kind == kind
    assert (spec.listen_host, spec.listen_port) == listen
    assert spec.text == value.split("@")[0]


@pytest.mark.parametrize("value,url,creds,listen", [
    ("upstream:http://proxy:3128", "http://proxy:3128", None, (None, None)),
    ("upstream:https://proxy", "https://proxy:443", None, (None, None)),
    ("upstream:http://proxy:3128@8081", "http://proxy:3128", None, (None, 8081)),
    ("upstream:http://proxy:3128@127.0.0.1:8081", "http://proxy:3128", None,
     ("127.0.0.1", 8081)),
    ("upstream:http://user:pass@proxy:3128", "http://proxy:3128", ("user", "pass"),
     (None, None)),
    ("upstream:http://user:pass@proxy:3128@8081", "http://proxy:3128", ("user", "pass"),
     (None, 8081)),
    ("upstream:http://us%40er:p%3Ass@proxy:3128/", "http://proxy:3128", ("us@er", "p:ss"),
     (None, None)),
    ("upstream:http://proxy/@127.0.0.2:8081", "http://proxy:80", None, ("127.0.0.2", 8081)),
    ("reverse:https://example.com", "https://example.com:443", None, (None, None)),
    ("reverse:http://[::1]:8000@9000", "http://[::1]:8000", None, (None, 9000)),
])
def test_url_modes(value, url, creds, listen):
    spec = parse_mode(value)
    assert spec.url == url
    assert (None if spec.user is None else (spec.user, spec.password)) == creds
    assert (spec.listen_host, spec.listen_port) == listen


def test_credentials_are_redacted_when_shown():
    spec = parse_mode("upstream:http://user:secret@proxy:3128@8081")
    assert spec.shown() == "upstream:http://<redacted>@proxy:3128"
    assert "secret" in spec.shown(redact=False)
    assert parse_mode("upstream:http://proxy:3128").shown() == "upstream:http://proxy:3128"


@pytest.mark.parametrize("value,words", [
    ("bogus", "unknown mode"),
    ("upstream", "needs a URL"),
    ("upstream:", "needs a URL"),
    ("reverse:ftp://x", "http:// or https://"),
    ("reverse:http://", "no host"),
    ("reverse:http://x/path", "must not have a path"),
    ("reverse:http://u:p@x", "credentials"),
    ("socks5:x", "takes no argument"),
    ("socks5@99999", "bad listen port"),
    ("upstream:http://x:notaport", "bad URL"),
])
def test_bad_modes(value, words):
    with pytest.raises(ModeError, match=words):
        parse_mode(value)


@pytest.mark.parametrize("args,words", [
    (["--mode", "bogus"], "--mode: unknown mode 'bogus'"),
    (["--mode", "socks5@8080", "--mode", "regular@8080"], "both listen on 127.0.0.1:8080"),
    (["--mode", "upstream:http://u:hunter2@x:1/@5", "--mode", "socks5@5"], "both listen"),
])
def test_mode_usage_errors_are_one_line_exit_2(args, words, tmp_path):
    r = run_cli(*args, home=tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.decode()
    assert words in err
    assert "hunter2" not in err
    assert "Traceback" not in err
    assert err.count("\n") == 1
