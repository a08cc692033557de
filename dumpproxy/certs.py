"""The certificate store: dumpproxy's CA on disk and leaf certificates minted per host.

Layout of the CA dir (0700):
  ca.pem       private key + certificate (0600); the one authoritative file, created
               atomically with link(2), so two processes starting together agree on one CA
  ca-cert.pem  the certificate alone (0644), what users hand to their clients

Leaves share one EC P-256 key generated per process; each host costs one signature.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import ssl
import stat
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dumpproxy.addresses import is_ip

CA_FILE = "ca.pem"
CA_CERT_FILE = "ca-cert.pem"
CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 365  # browsers refuse leaves valid for more than 398 days
BACKDATE = datetime.timedelta(days=2)  # tolerate client clocks a little behind
MAX_CONTEXTS = 4096  # cached server contexts (one per host and ALPN offer)


LEAF_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.2 suites the intercepting side offers


class CAError(Exception):
    """The CA could not be loaded or created; the message names the file."""


def default_ca_dir() -> str:
    env = os.environ
    if env.get("DUMPPROXY_HOME"):
        return env["DUMPPROXY_HOME"]
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "dumpproxy")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signatures (EC keys); a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dumpproxy CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dumpproxy"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    cert_path: str

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _unwritable(ca_dir: str, e: OSError) -> CAError:
    """One line naming the directory, why, and what to do."""
    return CAError(
        f"{ca_dir}: cannot write the CA there: {e.strerror or e}; give --ca-dir (or "
        f"DUMPPROXY_HOME) a directory you own, or fix its owner and permissions"
    )


def load_or_create_ca(ca_dir: str) -> CA:
    """Load the CA from ca_dir, creating it (and the dir) on first use.

    Every failure is a CAError with one line naming the file or directory and the fix."""
    try:
        os.makedirs(ca_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CAError(
            f"{ca_dir}: cannot create CA directory: {e.strerror}; give --ca-dir (or "
            f"DUMPPROXY_HOME) a directory you can create or own"
        ) from None
    path = os.path.join(ca_dir, CA_FILE)
    _check_surroundings(ca_dir, path)
    if not os.path.exists(path):
        _create_ca_file(ca_dir, path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CAError(
            f"{path}: cannot read CA: {e.strerror}; use --ca-dir (or DUMPPROXY_HOME) with "
            f"a directory of your own, or run as the CA's owner"
        ) from None
    try:
        key = serialization.load_pem_private_key(blob, password=None)
        cert = x509.load_pem_x509_certificate(blob[blob.index(b"-----BEGIN CERTIFICATE") :])
    except (ValueError, TypeError) as e:
        raise CAError(
            f"{path}: not a valid dumpproxy CA ({e}); move it away to create a new CA"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CAError(f"{path}: the key does not match the certificate; move it away")
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as e:
        raise CAError(
            f"{path}: the CA key is readable by others and cannot be made private "
            f"({e.strerror}); run 'chmod 600 {path}' as its owner, or use --ca-dir"
        ) from None
    cert_path = os.path.join(ca_dir, CA_CERT_FILE)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    try:
        with open(cert_path, "rb") as f:
            current = f.read()
    except OSError:
        current = None
    if current != pem:
        try:
            _write_atomic(cert_path, pem, 0o644)
        except OSError as e:
            raise _unwritable(ca_dir, e) from None
    return CA(key, cert, cert_path)  # type: ignore[arg-type]


def _check_surroundings(ca_dir: str, path: str) -> None:
    """Refuse a CA others could swap: a directory other users may write to (they could
    replace ca.pem with a CA of their own, or read a fresh key mid-write), and a ca.pem
    that is a symbolic link (its target would be read, and chmod-ed, wherever it is)."""
    try:
        st = os.stat(ca_dir)
    except OSError as e:
        raise CAError(f"{ca_dir}: cannot use the CA directory: {e.strerror}") from None
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise CAError(
            f"{ca_dir}: the CA directory is writable by other users (mode {mode:04o}), who "
            f"could swap the CA; run 'chmod 700 {ca_dir}' or give --ca-dir a private "
            f"directory"
        )
    if os.path.islink(path):
        raise CAError(
            f"{path}: the CA key file is a symbolic link; replace it with the file itself "
            f"(or give --ca-dir the directory it lives in)"
        )


def _create_ca_file(ca_dir: str, path: str) -> None:
    try:  # before the key is made: an unwritable directory fails at once
        fd, tmp = tempfile.mkstemp(dir=ca_dir, prefix=".tmp-ca-")
    except OSError as e:
        raise _unwritable(ca_dir, e) from None
    try:
        key, cert = _new_ca()
        blob = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ) + cert.public_bytes(serialization.Encoding.PEM)
        os.fchmod(fd, 0o600)
        os.write(fd, blob)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: use theirs
        except FileExistsError:
            pass
    except OSError as e:
        raise _unwritable(ca_dir, e) from None
    finally:
        os.unlink(tmp)


class CertStore:
    """Mints, caches and serves server-side SSLContexts per (host, ALPN offer)."""

    def __init__(self, ca: CA):
        self.ca = ca
        self.leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._dir = tempfile.mkdtemp(prefix="dumpproxy-leaves-")
        self._key_pem = self.leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self.leaf_key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())
        self._certs: dict[str, bytes] = {}
        self._contexts: dict[tuple[str, tuple[str, ...]], ssl.SSLContext] = {}
        self.minted = 0

    def leaf_cert(self, host: str) -> x509.Certificate:
        host = host.lower().rstrip(".")
        if is_ip(host):
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        else:
            san = x509.DNSName(host)
        now = _now()
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]
            if host
            else []
        )
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.ca.cert.subject)
            .public_key(self.leaf_key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=LEAF_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(self._ski, critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.ca.key, hashes.SHA256())
        )

    def _leaf_pem(self, host: str) -> bytes:
        pem = self._certs.get(host)
        if pem is None:
            pem = self.leaf_cert(host).public_bytes(serialization.Encoding.PEM)
            if len(self._certs) >= MAX_CONTEXTS:
                self._certs.pop(next(iter(self._certs)))
            self._certs[host] = pem
            self.minted += 1
        return pem

    def server_context(self, host: str, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """A server-side context presenting a leaf for host, offering these ALPN ids."""
        key = (host.lower(), alpn)
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            # AEAD suites only, as Mozilla's "intermediate" profile (TLS 1.3's are all AEAD;
            # no CBC: LUCKY13 and friends)
            ctx.set_ciphers(LEAF_CIPHERS)
            # The ssl module loads certificates only from files: write key + leaf to a
            # private file, load it, remove it at once.
            path = os.path.join(self._dir, "leaf.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # the CA after the leaf: a client that pins the CA's key (Chromium's
                # --ignore-certificate-errors-spki-list) sees it in the chain
                os.write(fd, self._key_pem + self._leaf_pem(key[0]) + self.ca.pem)
            finally:
                os.close(fd)
            try:
                ctx.load_cert_chain(path)
            finally:
                os.unlink(path)
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            # One TLS 1.3 session ticket per connection, not OpenSSL's two: a returning
            # client resumes with one, and each costs the handshake about 15 us to mint.
            ctx.num_tickets = 1
            # The client's order among these suites, not the server's (Python's default):
            # clients put AES-128-GCM first where their CPU has AES instructions and
            # ChaCha20 first where it has not, the cheaper choice for both ends.
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[key] = ctx
        return ctx

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
