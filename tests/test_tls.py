"""TLS interception end to end (SPEC §1 CA options, §2 `tls`/`error`, §4): real clients
(curl, httpx, Python ssl + http.client, raw sockets) through a real dumpproxy to a real
HTTPS origin, plus the CA on disk (creation, modes, defaults, damage, concurrent starts).
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import select
import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Origin, curl, open_tunnel, run_cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW_SLACK = datetime.timedelta(seconds=5)


# --- helpers ------------------------------------------------------------------------------


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def ca_cert_path(dp) -> Path:
    """The CA certificate dumpproxy announces (and that clients are told to trust)."""
    path = Path(dp.wait_for(lambda e: e["event"] == "listening")["ca_cert"])
    assert path == dp.home / "ca-cert.pem"
    return path


def load_ca(dp) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca_cert_path(dp).read_bytes())


def tls_through(dp, target: str, cafile, server_hostname: str | None,
                alpn: list[str] | None = None) -> ssl.SSLSocket:
    """TLS over a CONNECT tunnel, verifying the chain against cafile (and the name, if any).

    server_hostname None sends no SNI; an IP literal sends no SNI either but is checked
    against the certificate's IP SANs."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(open_tunnel(dp.port, target), server_hostname=server_hostname)


def get(tls: ssl.SSLSocket, host: str, path: str = "/small") -> bytes:
    """One HTTP/1.1 GET on an established TLS socket; returns the body (Content-Length)."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = tls.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk
        body += chunk
    return body


def leaf_of(tls: ssl.SSLSocket) -> x509.Certificate:
    der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


def san_of(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def check_leaf(leaf: x509.Certificate, ca: x509.Certificate) -> None:
    """What every minted leaf must satisfy for browsers and strict clients."""
    leaf.verify_directly_issued_by(ca)
    assert leaf.issuer == ca.subject
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc < datetime.timedelta(days=398)
    assert leaf.not_valid_before_utc <= now()
    assert leaf.not_valid_after_utc > now() + datetime.timedelta(days=30)
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def proxied(dp, origin: Origin, *extra: str, host: str = "localhost",
            path: str = "/small") -> subprocess.CompletedProcess:
    """curl through dumpproxy, trusting dumpproxy's CA; stdout = body + newline + code."""
    return curl("-x", dp.url, "--cacert", str(ca_cert_path(dp)), "-w", "\n%{http_code}",
                *extra, f"https://{host}:{origin.port}{path}")


@pytest.fixture(params=["default_loop", "asyncio_loop"])
def loop_env(request) -> dict[str, str]:
    """dumpproxy runs on uvloop when installed; the pure-asyncio fallback is tested too."""
    return {"DUMPPROXY_LOOP": "asyncio"} if request.param == "asyncio_loop" else {}


def events_of(dp, conn: int) -> list[dict]:
    with dp._cond:
        return [e for e in dp.events if e.get("conn") == conn]


# --- clients through the proxy --------------------------------------------------------------


def test_curl_https_through_proxy_and_events(dumpproxy, tls_origin, pki, loop_env):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path), env=loop_env)
    r = proxied(dp, tls_origin)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n\n200"
    url = f"https://localhost:{tls_origin.port}/small"
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == url and resp["status"] == 200 and resp["http_version"] == "HTTP/1.1"
    conn = resp["conn"]
    evs = events_of(dp, conn)
    kinds = [e["event"] for e in evs]
    server = next(e for e in evs if e["event"] == "tls" and e["side"] == "server")
    client = next(e for e in evs if e["event"] == "tls" and e["side"] == "client")
    req = next(e for e in evs if e["event"] == "request")
    address = f"localhost:{tls_origin.port}"
    assert server["address"] == client["address"] == address
    assert server["sni"] == client["sni"] == "localhost"
    assert server["alpn"] is None  # the origin does not do ALPN
    assert client["alpn"] == "http/1.1"  # curl offers h2 and http/1.1
    for e in (server, client):
        assert e["version"] in ("TLSv1.2", "TLSv1.3")
        assert isinstance(e["cipher"], str) and e["cipher"]
    assert (req["url"], req["scheme"], req["host"], req["port"], req["path"]) == (
        url, "https", "localhost", tls_origin.port, "/small")
    assert req["flow"] == resp["flow"] and resp["method"] == "GET"
    # order: decided, then both handshakes (upstream first: ALPN is settled there), then HTTP
    assert kinds.index("decision") < kinds.index("tls") < kinds.index("request")
    assert evs.index(server) < evs.index(client)
    decision = next(e for e in evs if e["event"] == "decision")
    assert decision["action"] == "intercept" and decision["address"] == address
    assert tls_origin.requests[-1][1] == "/small"


def test_httpx_through_proxy(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    verify = ssl.create_default_context(cafile=str(ca_cert_path(dp)))
    with httpx.Client(proxy=dp.url, verify=verify, trust_env=False, timeout=15) as c:
        r = c.get(f"https://localhost:{tls_origin.port}/echo?x=1", headers={"X-T": "1"})
    assert r.status_code == 200
    assert r.json()["path"] == "/echo?x=1" and r.json()["headers"]["X-T"] == "1"
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == f"https://localhost:{tls_origin.port}/echo?x=1"


def test_hey_through_proxy_whose_sni_carries_the_port(dumpproxy, tls_origin, pki):
    """hey (the shared benchmark's load generator) sends `host:port` as its SNI through a
    proxy: the name before the port is used, for the certificate and upstream."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    r = subprocess.run(["hey", "-n", "20", "-c", "2", "-x", dp.url,
                        f"https://localhost:{tls_origin.port}/small"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "[200]\t20 responses" in r.stdout, r.stdout
    dp.wait_for(lambda e: e["event"] == "response", count=20)
    assert not dp.of("error")
    assert {e["sni"] for e in dp.of("tls", side="client")} == {"localhost"}


def test_http_client_set_tunnel(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ctx = ssl.create_default_context(cafile=str(ca_cert_path(dp)))
    conn = http.client.HTTPSConnection("127.0.0.1", dp.port, context=ctx, timeout=15)
    conn.set_tunnel("localhost", tls_origin.port)
    try:
        conn.request("GET", "/small")
        r = conn.getresponse()
        assert (r.status, r.read()) == (200, b"hello\n")
    finally:
        conn.close()
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == f"https://localhost:{tls_origin.port}/small"


def test_keepalive_two_requests_one_tunnel(dumpproxy, tls_origin, pki, loop_env):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path), env=loop_env)
    ctx = ssl.create_default_context(cafile=str(ca_cert_path(dp)))
    conn = http.client.HTTPSConnection("127.0.0.1", dp.port, context=ctx, timeout=15)
    conn.set_tunnel("localhost", tls_origin.port)
    try:
        for path in ("/small", "/status/204"):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert r.status in (200, 204)
    finally:
        conn.close()
    dp.wait_for(lambda e: e["event"] == "response", count=2)
    dp.wait_for(lambda e: e["event"] == "client_disconnect")
    assert len(dp.of("client_connect")) == 1
    assert len(dp.of("decision")) == 1
    assert len(dp.of("tls", side="client")) == 1
    assert len(dp.of("server_connect")) == 1  # the upstream connection is reused too
    reqs, resps = dp.of("request"), dp.of("response")
    assert [r["path"] for r in reqs] == ["/small", "/status/204"]
    assert len({r["flow"] for r in reqs}) == 2
    assert [r["status"] for r in resps] == [200, 204]
    assert {e["conn"] for e in reqs + resps} == {dp.of("client_connect")[0]["conn"]}
    assert len(tls_origin.requests) == 2


def test_curl_two_urls_reuse_the_tunnel(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    base = f"https://localhost:{tls_origin.port}"
    r = curl("-x", dp.url, "--cacert", str(ca_cert_path(dp)), f"{base}/small", f"{base}/small")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\nhello\n"
    dp.wait_for(lambda e: e["event"] == "response", count=2)
    assert len(dp.of("decision")) == 1 and len(dp.of("client_connect")) == 1


# --- the leaf certificate the client sees ----------------------------------------------------


def test_leaf_for_sni(dumpproxy, tls_origin, pki):
    """CONNECT to an IP, SNI names a host: the leaf is for the SNI, signed by the CA."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = load_ca(dp)
    with tls_through(dp, f"127.0.0.1:{tls_origin.port}", ca_cert_path(dp),
                     "example.com") as tls:
        leaf = leaf_of(tls)
        assert get(tls, "example.com") == b"hello\n"
    check_leaf(leaf, ca)
    san = san_of(leaf)
    assert san.get_values_for_type(x509.DNSName) == ["example.com"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    client = dp.wait_for(lambda e: e["event"] == "tls" and e["side"] == "client")
    assert client["sni"] == "example.com"
    server = dp.of("tls", side="server")[0]
    assert server["sni"] == "example.com"  # the upstream handshake uses the client's SNI
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == f"https://example.com:{tls_origin.port}/small"


def test_leaf_for_connect_host_without_sni(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = load_ca(dp)
    with tls_through(dp, f"localhost:{tls_origin.port}", ca_cert_path(dp), None) as tls:
        leaf = leaf_of(tls)
        assert get(tls, "localhost") == b"hello\n"
    check_leaf(leaf, ca)
    assert san_of(leaf).get_values_for_type(x509.DNSName) == ["localhost"]
    client = dp.wait_for(lambda e: e["event"] == "tls" and e["side"] == "client")
    assert client["sni"] is None


def test_ip_target_gets_ip_san(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = load_ca(dp)
    # an IP literal as server_hostname: no SNI is sent, the IP SAN is checked by ssl
    with tls_through(dp, f"127.0.0.1:{tls_origin.port}", ca_cert_path(dp),
                     "127.0.0.1") as tls:
        leaf = leaf_of(tls)
        assert get(tls, f"127.0.0.1:{tls_origin.port}") == b"hello\n"
    check_leaf(leaf, ca)
    san = san_of(leaf)
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []
    client = dp.wait_for(lambda e: e["event"] == "tls" and e["side"] == "client")
    assert client["sni"] is None
    assert dp.of("tls", side="server")[0]["sni"] is None
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert resp["url"] == f"https://127.0.0.1:{tls_origin.port}/small"


def test_ipv6_target_gets_ip_san(dumpproxy, pki):
    o = Origin(pki.server_context(["::1"]), host="::1")
    try:
        dp = dumpproxy("--upstream-ca", str(pki.ca_path))
        ca = load_ca(dp)
        with tls_through(dp, f"[::1]:{o.port}", ca_cert_path(dp), "::1") as tls:
            leaf = leaf_of(tls)
            assert get(tls, f"[::1]:{o.port}") == b"hello\n"
        check_leaf(leaf, ca)
        assert san_of(leaf).get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("::1")]
        resp = dp.wait_for(lambda e: e["event"] == "response")
        assert resp["url"] == f"https://[::1]:{o.port}/small"
        assert dp.of("tls", side="client")[0]["address"] == f"[::1]:{o.port}"
    finally:
        o.close()


def test_leaf_is_cached_per_host(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = load_ca(dp)
    cafile = ca_cert_path(dp)
    target = f"127.0.0.1:{tls_origin.port}"
    ders = []
    # same host three times, with different ALPN offers (separate cached contexts)
    for alpn in (None, ["http/1.1"], ["h2", "http/1.1"]):
        with tls_through(dp, target, cafile, "localhost", alpn=alpn) as tls:
            ders.append(tls.getpeercert(binary_form=True))
            assert get(tls, "localhost") == b"hello\n"
    assert ders[0] == ders[1] == ders[2]
    with tls_through(dp, target, cafile, "example.com") as tls:
        other = leaf_of(tls)
    first = x509.load_der_x509_certificate(ders[0])
    check_leaf(other, ca)
    assert other.serial_number != first.serial_number
    assert san_of(other).get_values_for_type(x509.DNSName) == ["example.com"]
    # one shared leaf key for all hosts
    assert other.public_key().public_numbers() == first.public_key().public_numbers()
    with tls_through(dp, target, cafile, "localhost") as tls:
        assert tls.getpeercert(binary_form=True) == ders[0]


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_returning_client_resumes_its_session(dumpproxy, tls_origin, pki, version):
    """Leaf contexts are kept per name, so a client that kept its session (a ticket)
    resumes on its next connection: no certificate, no signature. TLS 1.3 clients get one
    ticket per connection (with the first reply when the request came with the
    handshake's end, else at once)."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    cafile = ca_cert_path(dp)
    target = f"127.0.0.1:{tls_origin.port}"
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    with ctx.wrap_socket(open_tunnel(dp.port, target), server_hostname="localhost") as tls:
        assert get(tls, "localhost") == b"hello\n"
        assert not tls.session_reused
        session = tls.session
    assert session is not None and session.has_ticket
    with ctx.wrap_socket(open_tunnel(dp.port, target), server_hostname="localhost",
                         session=session) as tls:
        assert tls.session_reused
        assert tls.version() == version.replace("_", ".")
        assert get(tls, "localhost") == b"hello\n"
    dp.stop()
    assert len(dp.of("tls", side="client")) == 2  # each connection still has its event


def test_a_client_yet_to_speak_gets_its_ticket_at_once(dumpproxy, tls_origin, pki):
    """The session ticket waits for the first response only when the request came with the
    client's Finished. A client with Nagle's algorithm on (no TCP_NODELAY, as here) sends
    its request only once its Finished is acknowledged, and an acknowledgement with no
    data to carry is delayed up to 40 ms: seen as the ticket arriving before the client
    says anything, through an eager tunnel and then a lazy one (on the pooled upstream)."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ctx = ssl.create_default_context(cafile=str(ca_cert_path(dp)))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for _ in range(2):
        raw = open_tunnel(dp.port, f"127.0.0.1:{tls_origin.port}")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            readable, _, _ = select.select([tls], [], [], 10)
            assert readable, "the proxy sent nothing after the handshake"
            assert get(tls, "localhost") == b"hello\n"
            assert tls.session is not None and tls.session.has_ticket
    dp.stop()
    assert len(dp.of("server_connect")) == 1  # the second tunnel was lazy (pooled upstream)


@pytest.mark.parametrize("version, offer, chosen", [
    ("1.3", ["--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"],
     "TLS_CHACHA20_POLY1305_SHA256"),
    ("1.3", ["--tls13-ciphers", "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"],
     "TLS_AES_128_GCM_SHA256"),
    ("1.2", ["--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384"],
     "ECDHE-ECDSA-CHACHA20-POLY1305"),
])
def test_the_client_order_of_cipher_suites_wins(dumpproxy, tls_origin, pki, version, offer,
                                                 chosen):
    """Among the suites both sides accept, the client's first choice is taken (ChaCha20 for
    a client without AES instructions, AES-128 for one with them), not the server's."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    r = proxied(dp, tls_origin, "--tlsv" + version, "--tls-max", version, *offer)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n\n200"
    tls = dp.wait_for(lambda e: e["event"] == "tls" and e["side"] == "client")
    assert (tls["version"], tls["cipher"]) == ("TLSv" + version, chosen)


# --- the CA on disk ------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _check_ca_dir(d: Path, printed: bytes) -> x509.Certificate:
    """d holds one consistent CA whose certificate is `printed`; returns it."""
    assert sorted(os.listdir(d)) == ["ca-cert.pem", "ca.pem"]
    assert _mode(d) == 0o700
    assert _mode(d / "ca.pem") == 0o600
    cert = x509.load_pem_x509_certificate(printed)
    assert (d / "ca-cert.pem").read_bytes() == printed
    blob = (d / "ca.pem").read_bytes()
    key = serialization.load_pem_private_key(blob, password=None)
    in_file = x509.load_pem_x509_certificate(blob[blob.index(b"-----BEGIN CERTIFICATE"):])
    assert in_file == cert
    assert key.public_key() == cert.public_key()
    return cert


def test_print_ca_creates_ca_in_ca_dir(tmp_path):
    d = tmp_path / "new" / "ca"
    r = run_cli("--print-ca", "--ca-dir", str(d), home=tmp_path / "unused")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert r.stdout.rstrip().endswith(b"-----END CERTIFICATE-----")
    assert b"PRIVATE KEY" not in r.stdout
    assert r.stderr == b""
    _check_ca_dir(d, r.stdout)
    assert not (tmp_path / "unused").exists()  # --ca-dir wins over DUMPPROXY_HOME
    again = run_cli("--print-ca", "--ca-dir", str(d))
    assert again.returncode == 0 and again.stdout == r.stdout


def test_print_ca_uses_dumpproxy_home(tmp_path):
    d = tmp_path / "dphome"
    r = run_cli("--print-ca", home=d, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0, r.stderr
    _check_ca_dir(d, r.stdout)
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("xdg", [True, False], ids=["xdg_config_home", "home_dot_config"])
def test_default_ca_dir_without_dumpproxy_home(tmp_path, xdg):
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = {"DUMPPROXY_HOME": None, "HOME": str(user_home),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg") if xdg else None}
    r = run_cli("--print-ca", env=env)
    assert r.returncode == 0, r.stderr
    expected = (tmp_path / "xdg" if xdg else user_home / ".config") / "dumpproxy"
    _check_ca_dir(expected, r.stdout)
    # the running proxy uses the same default CA
    p = subprocess.Popen([sys.executable, "-m", "dumpproxy", "-p", "0", "-q"], cwd=ROOT,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline()
    finally:
        p.terminate()
        p.communicate(timeout=15)
    assert b'"listening"' in line, line
    assert f'"ca_cert":"{expected / "ca-cert.pem"}"'.encode() in line


def test_ca_certificate_properties(tmp_path):
    d = tmp_path / "ca"
    r = run_cli("--print-ca", "--ca-dir", str(d))
    assert r.returncode == 0, r.stderr
    ca = _check_ca_dir(d, r.stdout)
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
    assert ca.not_valid_before_utc <= now()
    assert ca.not_valid_after_utc - now() > datetime.timedelta(days=5 * 365)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)


def test_loose_modes_and_stale_cert_file_are_repaired(tmp_path):
    d = tmp_path / "ca"
    first = run_cli("--print-ca", "--ca-dir", str(d))
    assert first.returncode == 0, first.stderr
    os.chmod(d / "ca.pem", 0o644)
    (d / "ca-cert.pem").write_bytes(b"stale\n")
    r = run_cli("--print-ca", "--ca-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert r.stdout == first.stdout
    _check_ca_dir(d, r.stdout)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _self_signed(key) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now() - NOW_SLACK)
            .not_valid_after(now() + datetime.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _corrupt_contents() -> dict[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = _self_signed(key).public_bytes(serialization.Encoding.PEM)
    return {
        "garbage": b"this is not a CA\n",
        "empty": b"",
        "key_only": _pem_key(key),
        "cert_only": cert_pem,
        "truncated": (_pem_key(key) + cert_pem)[:-200],
        "binary": bytes(range(256)) * 4,
    }


@pytest.mark.parametrize("kind", sorted(_corrupt_contents()))
@pytest.mark.parametrize("print_ca", [True, False], ids=["print_ca", "proxy"])
def test_corrupt_ca_pem_is_an_error_and_kept(tmp_path, kind, print_ca):
    d = tmp_path / "ca"
    d.mkdir(mode=0o700)
    content = _corrupt_contents()[kind]
    (d / "ca.pem").write_bytes(content)
    os.chmod(d / "ca.pem", 0o600)
    args = ["--print-ca"] if print_ca else ["-p", "0"]
    r = run_cli(*args, "--ca-dir", str(d), timeout=15)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == b""
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("dumpproxy: error: ") and str(d / "ca.pem") in err
    assert "Traceback" not in err
    assert (d / "ca.pem").read_bytes() == content  # never replaced
    assert os.listdir(d) == ["ca.pem"]


def test_ca_key_not_matching_cert(tmp_path):
    d = tmp_path / "ca"
    d.mkdir(mode=0o700)
    key_a = ec.generate_private_key(ec.SECP256R1())
    key_b = ec.generate_private_key(ec.SECP256R1())
    content = _pem_key(key_a) + _self_signed(key_b).public_bytes(serialization.Encoding.PEM)
    (d / "ca.pem").write_bytes(content)
    os.chmod(d / "ca.pem", 0o600)
    r = run_cli("--print-ca", "--ca-dir", str(d))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert str(d / "ca.pem") in err and "does not match" in err
    assert (d / "ca.pem").read_bytes() == content


def test_ca_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("--print-ca", "--ca-dir", str(blocker / "ca"))
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1 and str(blocker / "ca") in err, err


GATED_MAIN = """\
import sys
from dumpproxy.cli import main
sys.stderr.write("ready\\n")
sys.stderr.flush()
sys.stdin.read(1)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "barrier"])
def test_concurrent_first_start_agrees_on_one_ca(tmp_path, gated):
    """Several processes creating the CA in the same fresh dir at once all get one CA.

    `barrier` imports everything first, waits until all processes are ready, then
    releases them together so that the creation steps really overlap."""
    env = {k: v for k, v in os.environ.items() if k != "DUMPPROXY_HOME"}
    for rnd in range(3):
        d = tmp_path / f"round{rnd}" / "ca"
        cmd = [sys.executable, "-c", GATED_MAIN] if gated else [
            sys.executable, "-m", "dumpproxy"]
        procs = [subprocess.Popen([*cmd, "--print-ca", "--ca-dir", str(d)], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
                 for _ in range(6)]
        if gated:
            for p in procs:
                assert p.stderr.readline() == b"ready\n"
            for p in procs:
                p.stdin.write(b"g")
                p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            assert err == b""
        printed = {out for out, _ in outs}
        assert len(printed) == 1, f"round {rnd}: {len(printed)} different CAs printed"
        _check_ca_dir(d, printed.pop())


# --- failures: untrusted upstream, untrusting client ---------------------------------------


def test_untrusted_upstream_is_502_and_k_works(dumpproxy, tls_origin, loop_env):
    dp = dumpproxy(env=loop_env)  # the test origin's CA is not in the system store
    r = proxied(dp, tls_origin)
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition(b"\n")
    assert code == b"502"
    text = body.decode()
    assert "localhost" in text and "not trusted" in text and "certificate" in text
    assert "--upstream-ca" in text and "-k" in text
    err = dp.wait_for(lambda e: e["event"] == "error" and e["stage"] == "server_tls")
    assert err["address"] == f"localhost:{tls_origin.port}"
    assert "certificate" in err["message"] and err["message"] == text.rstrip("\n")
    assert not dp.of("tls", side="server")
    # the request the client sent is in the record, answered by dumpproxy; the error,
    # written when it was answered, carries its flow
    [req] = dp.of("request")
    resp = dp.wait_for(lambda e: e["event"] == "response")
    assert req["flow"] == err["flow"] == resp["flow"]
    assert (req["url"], resp["status"]) == (f"https://localhost:{tls_origin.port}/small", 502)
    assert tls_origin.requests == []  # never silently downgraded

    dpk = dumpproxy("-k", env=loop_env)
    r = proxied(dpk, tls_origin)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n\n200"
    dpk.wait_for(lambda e: e["event"] == "response")
    assert dpk.of("tls", side="server") and not dpk.of("error")


def test_upstream_hostname_mismatch_is_502(dumpproxy, tls_origin, pki):
    """The upstream chain is trusted but its certificate is not for the SNI: still 502."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    with tls_through(dp, f"127.0.0.1:{tls_origin.port}", ca_cert_path(dp),
                     "other.test") as tls:
        tls.sendall(b"GET /small HTTP/1.1\r\nHost: other.test\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 502 "), data
    assert b"other.test" in data and b"not trusted" in data
    err = dp.wait_for(lambda e: e["event"] == "error" and e["stage"] == "server_tls")
    assert "other.test" in err["message"]
    assert tls_origin.requests == []


@pytest.mark.parametrize("content", [None, b"not a certificate\n"], ids=["missing", "garbage"])
def test_bad_upstream_ca_file_is_a_usage_error(tmp_path, content):
    path = tmp_path / "bundle.pem"
    if content is not None:
        path.write_bytes(content)
    r = run_cli("--upstream-ca", str(path), "-p", "0", home=tmp_path / "h", timeout=15)
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("dumpproxy: error: --upstream-ca: ") and str(path) in last
    assert "Traceback" not in r.stderr.decode()


def _client_tls_error(dp) -> dict:
    err = dp.wait_for(lambda e: e["event"] == "error" and e["stage"] == "client_tls")
    msg = err["message"]
    assert "does not trust the dumpproxy CA" in msg, msg
    assert "--print-ca" in msg and str(dp.home / "ca-cert.pem") in msg
    return err


def test_curl_without_dumpproxy_ca_fails_with_hint(dumpproxy, tls_origin, pki, loop_env):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path), env=loop_env)
    r = curl("-x", dp.url, f"https://localhost:{tls_origin.port}/small")
    assert r.returncode == 60, r.stderr  # peer certificate cannot be authenticated
    err = _client_tls_error(dp)
    assert err["address"] == f"localhost:{tls_origin.port}"
    assert not dp.of("tls", side="client") and not dp.of("request")
    assert tls_origin.requests == []


def test_python_client_without_dumpproxy_ca_fails_with_hint(dumpproxy, tls_origin, pki):
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))  # trusts only the origin CA
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(open_tunnel(dp.port, f"localhost:{tls_origin.port}"),
                        server_hostname="localhost")
    _client_tls_error(dp)


# --- a failed client handshake is worded by its cause -------------------------------------


def _handshake_fails(dp, port: int, ctx: ssl.SSLContext) -> dict:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(open_tunnel(dp.port, f"localhost:{port}"), server_hostname="localhost")
    return dp.wait_for(lambda e: e["event"] == "error" and e["stage"] == "client_tls")


@pytest.mark.parametrize("cause", ["old_version", "cbc_only"])
def test_no_common_ground_is_no_certificate_problem(dumpproxy, tls_origin, pki, cause):
    """A client that offers nothing the proxy speaks is told what was missing, not to trust
    the CA (no certificate was ever sent): testssl.sh's probes, old clients."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cause == "old_version":
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        expected = "TLS versions dumpproxy does not speak"
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256")  # CBC only
        expected = "no cipher suite dumpproxy accepts"
    err = _handshake_fails(dp, tls_origin.port, ctx)
    assert expected in err["message"], err
    assert "trust the dumpproxy CA" not in err["message"] and "--print-ca" not in err["message"]


def test_intercepting_side_offers_aead_suites_only(dumpproxy, tls_origin, pki):
    """Mozilla's "intermediate" profile: no CBC suite is accepted from a client (LUCKY13),
    and an AEAD one is."""
    dp = dumpproxy("--upstream-ca", str(pki.ca_path))
    ca = str(dp.home / "ca-cert.pem")
    for cipher in ("ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256"):
        r = subprocess.run(["openssl", "s_client", "-connect", f"localhost:{tls_origin.port}",
                            "-proxy", f"127.0.0.1:{dp.port}", "-tls1_2", "-cipher", cipher,
                            "-servername", "localhost"], input=b"", capture_output=True,
                           timeout=20)
        assert b"Cipher is (NONE)" in r.stdout or r.returncode != 0, (cipher, r.stdout[-300:])
    ctx = ssl.create_default_context(cafile=ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with ctx.wrap_socket(open_tunnel(dp.port, f"localhost:{tls_origin.port}"),
                         server_hostname="localhost") as tls:
        assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


# --- passthrough ------------------------------------------------------------------------


def test_ignored_host_passes_tls_through(dumpproxy, tls_origin, pki, loop_env):
    # no --upstream-ca: a passed-through tunnel is never checked by dumpproxy
    dp = dumpproxy("--ignore-hosts", "localhost", env=loop_env)
    r = curl("-x", dp.url, "--cacert", str(pki.ca_path), "-w", "\n%{http_code}",
             f"https://localhost:{tls_origin.port}/small")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n\n200"
    with tls_through(dp, f"localhost:{tls_origin.port}", pki.ca_path, "localhost") as tls:
        leaf = leaf_of(tls)
        assert get(tls, "localhost") == b"hello\n"
    leaf.verify_directly_issued_by(pki.cert)  # the origin's own certificate
    assert "localhost" in san_of(leaf).get_values_for_type(x509.DNSName)
    dp.wait_for(lambda e: e["event"] == "client_disconnect", count=2)
    decisions = dp.of("decision")
    assert len(decisions) == 2
    for d in decisions:
        assert (d["action"], d["reason"], d["pattern"], d["sni"]) == (
            "passthrough", "ignore_hosts", "localhost", "localhost")
    assert not dp.of("tls") and not dp.of("request")
    assert not dp.of("error"), [e["message"] for e in dp.of("error")]


# --- ALPN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("origin_alpn", [None, ["http/1.1"]], ids=["no_alpn", "http11_alpn"])
def test_h2_offer_to_http11_origin_gets_http11(dumpproxy, pki, origin_alpn):
    o = Origin(pki.server_context(["localhost", "127.0.0.1"], alpn=origin_alpn))
    try:
        dp = dumpproxy("--upstream-ca", str(pki.ca_path))
        r = curl("--http2", "-x", dp.url, "--cacert", str(ca_cert_path(dp)),
                 "-w", "\n%{http_version}", f"https://localhost:{o.port}/small")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"hello\n\n1.1"
        resp = dp.wait_for(lambda e: e["event"] == "response")
        assert resp["http_version"] == "HTTP/1.1" and resp["status"] == 200
        client = dp.of("tls", side="client")[0]
        assert client["alpn"] == "http/1.1"
        assert dp.of("tls", side="server")[0]["alpn"] == (origin_alpn[0] if origin_alpn
                                                          else None)
        with tls_through(dp, f"localhost:{o.port}", ca_cert_path(dp), "localhost",
                         alpn=["h2", "http/1.1"]) as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            assert get(tls, "localhost") == b"hello\n"
    finally:
        o.close()
