import os
import random
import ssl
import struct

import pytest

from dumpproxy.clienthello import Peek, classify

CAP = 64 * 1024


def make_hello(server_hostname: str | None = "example.com", alpn=("h2", "http/1.1")) -> bytes:
    """A genuine ClientHello as OpenSSL sends it (one or more TLS records)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def handshake_bytes(records: bytes) -> bytes:
    """Strip the TLS record framing, returning the concatenated handshake bytes."""
    out, pos = b"", 0
    while pos < len(records):
        assert records[pos] == 22
        (length,) = struct.unpack("!H", records[pos + 3 : pos + 5])
        out += records[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def reframe(handshake: bytes, size: int = 50, version: bytes = b"\x03\x01") -> bytes:
    """Re-frame handshake bytes into TLS records of at most ``size`` bytes each."""
    return b"".join(
        b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
        for chunk in (handshake[i : i + size] for i in range(0, len(handshake), size))
    )


def synth_hello(*extensions: tuple[int, bytes]) -> bytes:
    """A minimal hand-built ClientHello record carrying the given extensions."""
    exts = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in extensions)
    body = (
        b"\x03\x03"
        + os.urandom(32)
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # cipher suites
        + b"\x01\x00"  # compression methods
        + struct.pack("!H", len(exts))
        + exts
    )
    return reframe(b"\x01" + len(body).to_bytes(3, "big") + body, size=2**14)


def sni_ext(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return 0, struct.pack("!H", len(entries)) + entries


def alpn_ext(*protos: bytes) -> tuple[int, bytes]:
    entries = b"".join(bytes([len(p)]) + p for p in protos)
    return 16, struct.pack("!H", len(entries)) + entries


@pytest.fixture(scope="module")
def hello() -> bytes:
    return make_hello("Example.COM")


# --- TLS: genuine hellos ---------------------------------------------------


def test_sni_and_alpn(hello):
    assert classify(hello) == Peek("tls", True, "example.com", ("h2", "http/1.1"))


@pytest.mark.parametrize("server_hostname", [None, "127.0.0.1", "::1"])
def test_no_sni(server_hostname):
    peek = classify(make_hello(server_hostname, alpn=("http/1.1",)))
    assert peek == Peek("tls", True, None, ("http/1.1",))


def test_no_alpn():
    assert classify(make_hello("a.test", alpn=())) == Peek("tls", True, "a.test", ())


def test_every_prefix_incomplete(hello):
    expected = classify(hello)
    assert all(classify(hello[:n]) == Peek("tls", False) for n in range(1, len(hello)))
    assert classify(hello) == expected


@pytest.mark.parametrize("size", [1, 7, 50, 300])
def test_split_into_records(hello, size):
    framed = reframe(handshake_bytes(hello), size)
    assert framed != hello
    assert classify(framed) == classify(hello)
    assert all(classify(framed[:n]) == Peek("tls", False) for n in range(1, len(framed), 13))


def test_trailing_records_ignored(hello):
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert classify(hello + ccs + b"\x17\x03\x03\x00\x05hello") == classify(hello)


# --- TLS: malformed --------------------------------------------------------


def test_header_plus_zeros():
    assert classify(b"\x16\x03\x01\x00\x10" + b"\x00" * 16) == Peek("tls", True)


@pytest.mark.parametrize("length", [0x4000, 0xFFFF])
def test_large_header_plus_zeros(length):
    header = b"\x16\x03\x01" + struct.pack("!H", length)
    assert classify(header + b"\x00" * length) == Peek("tls", True)
    assert classify(header + b"\x00") == Peek("tls", True)  # type byte alone decides
    assert classify(header) == Peek("tls", False)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16garbage garbage",
        b"\x16\x02",  # bad major version
        b"\x16\x03\x01\x00\x00",  # zero-length record
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # ServerHello, not ClientHello
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # body too short for version+random
    ],
)
def test_garbage_after_0x16(data):
    assert classify(data) == Peek("tls", True)


@pytest.mark.parametrize("data", [b"\x16", b"\x16\x03", b"\x16\x03\x01\x00"])
def test_partial_record_header(data):
    assert classify(data) == Peek("tls", False)


def test_bad_second_record_header(hello):
    framed = bytearray(reframe(handshake_bytes(hello), 50))
    framed[55] = 23  # second record claims to be application data
    assert classify(bytes(framed)) == Peek("tls", True)
    framed[55], framed[56] = 22, 2  # ... or has a bad version
    assert classify(bytes(framed)) == Peek("tls", True)


def test_extensions_overrun(hello):
    hs = bytearray(handshake_bytes(hello))
    off = 4 + 34
    off += 1 + hs[off]  # session id
    off += 2 + int.from_bytes(hs[off : off + 2], "big")  # cipher suites
    off += 1 + hs[off]  # compression methods
    hs[off : off + 2] = (len(hs) - off).to_bytes(2, "big")  # 2 bytes too long
    assert classify(reframe(bytes(hs))) == Peek("tls", True)


def test_synthetic_hello():
    data = synth_hello(sni_ext(b"WWW.x.org"), alpn_ext(b"h2"))
    assert classify(data) == Peek("tls", True, "www.x.org", ("h2",))
    # Non-host_name entries are skipped; the first host_name wins.
    data = synth_hello(sni_ext(b"zz", name_type=7), sni_ext(b"b.test"))
    assert classify(data).sni == "b.test"


@pytest.mark.parametrize("sent, meant", [
    (b"127.0.0.1:18443", "127.0.0.1"),  # hey, through a proxy: Go's ServerName with a port
    (b"App.Test:443", "app.test"),
    (b"app.test:", "app.test:"),  # no port digits: left as sent (and refused as a name)
    (b"a:b:443", "a:b:443"),  # more than one colon: not a name with a port
])
def test_sni_with_a_port_names_the_host(sent, meant):
    """A host name has no port (RFC 6066 3); a client that appends one means the name."""
    assert classify(synth_hello(sni_ext(sent))).sni == meant


@pytest.mark.parametrize(
    "ext",
    [
        sni_ext(b""),  # empty name
        sni_ext("bücher.de".encode()),  # non-ascii
        sni_ext(b"a b"),  # whitespace
        (0, b""),  # server_name without a list
        (0, b"\x00\x10\x00\x00\x01a"),  # list length overruns the extension
        (0, b"\x00\x04\x00\x00\x05a"),  # name length overruns the list
        alpn_ext(b"h2", b""),  # empty protocol
        (16, b"\x00\x03\x05h2"),  # protocol overruns the list
    ],
)
def test_malformed_extensions(ext):
    assert classify(synth_hello(ext, alpn_ext(b"h2"))) == Peek("tls", True)


def test_cap():
    # A plausible header declaring a ~64 KB hello, framed in tiny records so the
    # overhead pushes it past the cap before it can be complete.
    body_len = CAP - 600
    hs = b"\x01" + body_len.to_bytes(3, "big") + b"\x03\x03" + b"\x00" * (body_len - 2)
    data = reframe(hs, 16)
    assert classify(data[:CAP]) == Peek("tls", False)
    assert classify(data[: CAP + 1]) == Peek("tls", True)
    # A declared length that could never fit is decided at once.
    assert classify(reframe(b"\x01\x02\x00\x00\x03\x03")) == Peek("tls", True)


# --- HTTP/1 ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data, host",
    [
        (b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "example.com"),
        (b"GET / HTTP/1.1\r\nHost:x\r\n\r\n", "x"),
        (b"GET / HTTP/1.1\r\nhOST: \t a.b:8080 \t\r\n\r\n", "a.b:8080"),
        (b"GET / HTTP/1.1\r\nX-Host: a\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\n Host: a\r\nHost : b\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: one\r\nHost: two\r\n\r\nbody", "one"),
        (b"GET / HTTP/1.1\r\n\r\nHost: body\r\n\r\n", None),
        (b"M-SEARCH * HTTP/1.1\nHost: lf.example\n\n", "lf.example"),
        (b"POST / HTTP/1.0\r\nHost: mixed\n\r\n", "mixed"),
    ],
)
def test_http_host(data, host):
    assert classify(data) == Peek("http", True, host=host)


@pytest.mark.parametrize(
    "data",
    [b"G", b"GE", b"GET", b"GET ", b"GET / HTTP/1.1\r\nHost: a\r\n", b"A" * 20],
)
def test_http_incomplete(data):
    assert classify(data) == Peek("http", False)


def test_http_cap():
    head = b"GET / HTTP/1.1\r\nHost: big\r\n" + b"X-Pad: " + b"p" * 100 + b"\r\n"
    data = head + b"X-Pad: " + b"p" * CAP
    assert classify(data[:CAP]) == Peek("http", False)
    assert classify(data) == Peek("http", True, host="big")
    assert classify(b"GET /" + b"a" * CAP) == Peek("http", True)


# --- h2c and other ---------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_h2c():
    assert classify(PREFACE) == Peek("h2c", True)
    assert classify(PREFACE + b"\x00\x00\x00\x04") == Peek("h2c", True)
    assert all(classify(PREFACE[:n]) == Peek("h2c", False) for n in range(1, len(PREFACE)))
    assert classify(PREFACE[:16] + b"X") == Peek("h2c", True)  # diverged after the start


@pytest.mark.parametrize(
    "data", [b"\x00\x01\x02\x03", bytes(range(255, 0, -1)), b"get / HTTP/1.1\r\n", b"A" * 21, b"{"]
)
def test_other(data):
    assert classify(data) == Peek("other", True)


def test_empty():
    assert classify(b"") == Peek("other", False)


def test_random_never_raises(hello):
    rng = random.Random(1234)
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(1, 64))
        if rng.random() < 0.5:
            data = b"\x16\x03\x01" + data
        assert isinstance(classify(data), Peek)
    for _ in range(2000):  # corrupt a few bytes of a real hello
        data = bytearray(hello)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(1, len(data))] = rng.randrange(256)
        assert classify(bytes(data)).kind == "tls"
