"""Wrap mode's runtimes: what each one needs beyond the proxy and CA variables.

The proxy variables and the CA bundle (`runner.wrap_env`) serve curl, wget, git, Python,
Go, Ruby, Bun and aiohttp with `trust_env=True`. The runtimes that read neither get their
own way in, the one each documents: Node older than 24 a preload in NODE_OPTIONS, Java
system properties and a trust store in JAVA_TOOL_OPTIONS, PHP an ini file (its streams
read no variable), Deno DENO_CERT, and Chromium/Chrome command-line switches (they read
no variable at all). The man page's RUNTIMES table says the same, per runtime.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

HERE = Path(__file__).resolve().parent
NODE_PRELOAD = HERE / "node-preload.cjs"
PHP_PREPEND = HERE / "php-prepend.php"

# Recognised by the command's name (its last path component).
BROWSERS = frozenset({
    "chromium", "chromium-browser", "chrome", "google-chrome", "google-chrome-stable",
    "google-chrome-beta", "google-chrome-unstable", "chrome-headless-shell",
})
# A user's own proxy choice on a browser's command line is kept as it is.
BROWSER_PROXY_SWITCHES = ("--proxy-server", "--proxy-pac-url", "--no-proxy-server",
                          "--proxy-auto-detect")
SPKI_SWITCH = "--ignore-certificate-errors-spki-list"
BYPASS_SWITCH = "--proxy-bypass-list"


def spki_pin(ca_pem: bytes) -> str:
    """Base64 SHA-256 of the CA's SubjectPublicKeyInfo: what Chromium's
    --ignore-certificate-errors-spki-list takes (the man page's openssl pipeline)."""
    spki = x509.load_pem_x509_certificate(ca_pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def no_proxy_entries(env: dict[str, str]) -> list[str]:
    value = env.get("NO_PROXY") or env.get("no_proxy") or ""
    return [e for e in value.replace(",", " ").split() if e]


def is_browser(command: list[str]) -> bool:
    return os.path.basename(command[0]) in BROWSERS


def browser_command(command: list[str], proxy_url: str | None, pin: str,
                    no_proxy: list[str]) -> list[str]:
    """Chromium/Chrome: the proxy (loopback included, as for every other client: Chromium
    leaves it out by itself) and the CA's SPKI pin, added to the switches the user gave.
    A user's own proxy switch stays as it is; a user's own pin list gets ours added."""
    args = list(command[1:])
    added: list[str] = []

    def given(switch: str) -> int | None:
        return next((i for i, a in enumerate(args)
                     if a == switch or a.startswith(switch + "=")), None)

    if proxy_url is not None and all(given(s) is None for s in BROWSER_PROXY_SWITCHES):
        # --proxy-server takes no credentials (--proxyauth): the browser asks for them
        u = urlsplit(proxy_url)
        added.append(f"--proxy-server={u._replace(netloc=u.netloc.rpartition('@')[2]).geturl()}")
        if given(BYPASS_SWITCH) is None:
            added.append(f"{BYPASS_SWITCH}=" + ";".join(["<-loopback>", *no_proxy]))
    i = given(SPKI_SWITCH)
    if i is not None and "=" in args[i]:
        args[i] = f"{args[i]},{pin}"
    else:
        added.append(f"{SPKI_SWITCH}={pin}")
    return [command[0], *added, *args]


def browser_note(command: list[str]) -> str | None:
    """Chrome honours the pin only with --user-data-dir (headless has one of its own)."""
    if any(a.startswith(("--user-data-dir", "--headless")) for a in command[1:]):
        return None
    return (f"dumpproxy: note: {os.path.basename(command[0])} honours the CA pin only with "
            "--user-data-dir=DIR (or --headless); without it intercepted HTTPS fails")


def java_non_proxy_hosts(no_proxy: list[str]) -> str:
    """NO_PROXY in http.nonProxyHosts' syntax: `|`-separated, `*` wildcards, no ports.
    Empty when there is none: Java's own default (localhost|127.*|[::1]) would send
    loopback past the proxy, which no other client in wrap mode does."""
    out = []
    for entry in no_proxy:
        if entry.startswith("[") and "]" in entry:  # [v6]:port: Java writes [v6] too
            host = entry[:entry.index("]") + 1]
        else:
            host = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        out.append("*" + host if host.startswith(".") else host)
    return "|".join(out)


def _quoted(value: str) -> str:
    """One option of NODE_OPTIONS or JAVA_TOOL_OPTIONS (both split on blanks and take
    double quotes)."""
    return f'"{value}"' if any(c.isspace() for c in value) or not value else value


def append_options(env: dict[str, str], name: str, options: list[str]) -> None:
    """Ours after the user's own: for repeated -D properties the last one wins."""
    env[name] = " ".join(filter(None, [env.get(name, "").strip(), *options]))


PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def write_java_truststore(bundle: bytes, path: Path) -> None:
    """Every certificate of the bundle (system CAs + ours) as a trusted entry of a
    PKCS#12 trust store (cryptography's Java trust store writer; no password: it holds
    public certificates only). One by one: a system CA that cryptography declines (or
    warns about, as it does for a non-positive serial number) is left out, not fatal."""
    entries = []
    for block in PEM_CERT.findall(bundle):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue
        entries.append(pkcs12.PKCS12Certificate(cert, f"ca-{len(entries)}".encode()))
    path.write_bytes(pkcs12.serialize_java_truststore(
        entries, serialization.NoEncryption()))


def _php_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RuntimeFiles:
    """The files the runtimes read (Java trust store, PHP ini), in a private temporary
    directory removed after the run."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dumpproxy-wrap-"))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def apply(self, env: dict[str, str], proxy_url: str | None, bundle: str) -> None:
        """Add each runtime's settings to CMD's environment (`env`, already holding the
        proxy and CA variables)."""
        # Node 18-22 (Node >= 24: NODE_USE_ENV_PROXY, set by runner.wrap_env)
        append_options(env, "NODE_OPTIONS", [f"--require {_quoted(str(NODE_PRELOAD))}"])
        # Deno: its own roots plus this file (the proxy variables it reads itself)
        env["DENO_CERT"] = bundle
        # Java: trust store, and the proxy as system properties
        store = self.dir / "java-truststore.p12"
        write_java_truststore(Path(bundle).read_bytes(), store)
        java = [f"-Djavax.net.ssl.trustStore={_quoted(str(store))}",
                "-Djavax.net.ssl.trustStoreType=PKCS12"]
        if proxy_url is not None:
            u = urlsplit(proxy_url)
            host, port = u.hostname or "127.0.0.1", u.port or 80
            for scheme in ("http", "https"):
                java += [f"-D{scheme}.proxyHost={host}", f"-D{scheme}.proxyPort={port}"]
            java.append(f"-Dhttp.nonProxyHosts={java_non_proxy_hosts(no_proxy_entries(env))}")
        append_options(env, "JAVA_TOOL_OPTIONS", java)
        # PHP: an ini file scanned after the system's (a leading ':' keeps those)
        ini_dir = self.dir / "php"
        ini_dir.mkdir()
        (ini_dir / "dumpproxy.ini").write_text(
            "; dumpproxy wrap mode\n"
            f"auto_prepend_file = {_php_string(str(PHP_PREPEND))}\n"
            f"openssl.cafile = {_php_string(bundle)}\n"
            f"curl.cainfo = {_php_string(bundle)}\n")
        env["PHP_INI_SCAN_DIR"] = f"{env.get('PHP_INI_SCAN_DIR', '')}:{ini_dir}"


def prepare(files: RuntimeFiles, command: list[str], env: dict[str, str],
            proxy_url: str | None, bundle: str, ca_pem: bytes, browser_flags: bool
            ) -> tuple[list[str], list[str]]:
    """CMD's runtime settings added to `env`; (the command to run, notes for stderr)."""
    files.apply(env, proxy_url, bundle)
    if not (browser_flags and is_browser(command)):
        return command, []
    command = browser_command(command, proxy_url, spki_pin(ca_pem), no_proxy_entries(env))
    note = browser_note(command)
    return command, [note] if note else []
