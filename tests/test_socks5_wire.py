"""The SOCKS5 wire format (dumpproxy.socks5, pure): RFC 1928 / RFC 1929, and a fuzz test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dumpproxy import socks5
from dumpproxy.socks5 import SocksError


def test_greeting_complete_and_partial():
    assert socks5.parse_greeting(b"") is None
    assert socks5.parse_greeting(b"\x05") is None
    assert socks5.parse_greeting(b"\x05\x02\x00") is None
    assert socks5.parse_greeting(b"\x05\x02\x00\x02") == ((0, 2), 4)
    assert socks5.parse_greeting(b"\x05\x01\x00rest") == ((0,), 3)


@pytest.mark.parametrize("data", [b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n", b"\x05\x00"])
def test_greeting_not_socks5_is_closed_without_reply(data):
    with pytest.raises(SocksError) as e:
        socks5.parse_greeting(data)
    assert e.value.reply is None


def test_choose_method():
    assert socks5.choose_method((0,), need_auth=False) == socks5.NO_AUTH
    assert socks5.choose_method((0, 2), need_auth=True) == socks5.USER_PASS
    assert socks5.choose_method((0,), need_auth=True) == socks5.NO_ACCEPTABLE
    assert socks5.choose_method((2,), need_auth=False) == socks5.NO_ACCEPTABLE
    assert socks5.method_reply(2) == b"\x05\x02"


def test_user_pass():
    msg = b"\x01\x05alice\x06s3cr3t"
    for cut in range(len(msg)):
        assert socks5.parse_user_pass(msg[:cut]) is None
    assert socks5.parse_user_pass(msg + b"x") == (b"alice", b"s3cr3t", len(msg))
    assert socks5.parse_user_pass(b"\x01\x00\x00") == (b"", b"", 3)
    with pytest.raises(SocksError):
        socks5.parse_user_pass(b"\x05\x01a\x01b")
    assert socks5.auth_reply(True) == b"\x01\x00"
    assert socks5.auth_reply(False) == b"\x01\x01"


@pytest.mark.parametrize("host,port,atyp", [
    ("127.0.0.1", 80, socks5.ATYP_IPV4),
    ("2001:db8::1", 443, socks5.ATYP_IPV6),
    ("example.com", 8443, socks5.ATYP_DOMAIN),
])
def test_request_round_trip_and_partial(host, port, atyp):
    msg = socks5.encode_request(socks5.CONNECT, host, port)
    for cut in range(len(msg)):
        assert socks5.parse_request(msg[:cut]) is None
    req, used = socks5.parse_request(msg + b"\x16\x03\x01")
    assert used == len(msg)
    assert (req.command, req.host, req.port, req.atyp) == (socks5.CONNECT, host, port, atyp)


def test_request_bind_and_udp_are_parsed_for_the_caller_to_refuse():
    for cmd in (socks5.BIND, socks5.UDP_ASSOCIATE):
        req, _ = socks5.parse_request(socks5.encode_request(cmd, "127.0.0.1", 9))
        assert req.command == cmd


def test_request_errors_carry_reply_codes():
    with pytest.raises(SocksError) as e:
        socks5.parse_request(b"\x05\x01\x00\x05" + b"\x00" * 8)
    assert e.value.reply == socks5.ADDRESS_TYPE_NOT_SUPPORTED
    with pytest.raises(SocksError) as e:
        socks5.parse_request(b"\x04\x01\x00\x01" + b"\x00" * 6)
    assert e.value.reply == socks5.GENERAL_FAILURE
    with pytest.raises(SocksError) as e:
        socks5.parse_request(b"\x05\x01\x00\x03\x00\x00\x50")
    assert e.value.reply == socks5.HOST_UNREACHABLE
    with pytest.raises(SocksError):
        socks5.parse_request(b"\x05\x01\x00\x03\x03a b\x00\x50")


def test_reply_encoding():
    assert socks5.reply(0, "127.0.0.1", 8080) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"
    assert socks5.reply(5) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    six = socks5.reply(0, "::1", 1)
    assert six[:4] == b"\x05\x00\x00\x04" and len(six) == 4 + 16 + 2
    assert socks5.reply(1, "localhost", 5) == socks5.reply(1)  # not an IP literal: zeros


# --- fuzz: never an exception other than SocksError, never more bytes used than given ---

_PARSERS = (socks5.parse_greeting, socks5.parse_user_pass, socks5.parse_request)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_never_crash_on_any_input(data):
    for parser in _PARSERS:
        try:
            result = parser(data)
        except SocksError as e:
            assert e.reply is None or e.reply in socks5.REPLY_TEXT
            continue
        if result is not None:
            assert 0 < result[-1] <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 3, 0x7F]), st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9](?:[a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True)),
    st.integers(0, 65535), st.binary(max_size=20))
def test_encoded_requests_parse_back(cmd, host, port, tail):
    msg = socks5.encode_request(cmd, host, port)
    req, used = socks5.parse_request(msg + tail)
    assert used == len(msg)
    assert (req.command, req.host, req.port) == (cmd, host, port)
    assert struct.unpack("!H", msg[-2:])[0] == port
