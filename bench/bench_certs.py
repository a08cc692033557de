"""What a TLS-intercepted host costs dumpproxy: first seen (mint a leaf + build an SSLContext)
versus cached, measured on CertStore directly (no network, no proxy process).

    python bench/bench_certs.py [--hosts 200] [--repeat 5]

Prints one table (microseconds per host: median, p90, mean). The CA is created in a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from dumpproxy.certs import CertStore, load_or_create_ca  # noqa: E402

ALPN = ("http/1.1",)


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e6


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str) -> None:
    """A complete TLS handshake in memory (both ends in this process)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done_c = done_s = False
    while not (done_c and done_s):
        if not done_c:
            try:
                client.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not done_s:
            try:
                server.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())


def stats(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return statistics.median(ordered), p90, statistics.fmean(ordered)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=200, help="distinct hosts (default 200)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="cached look-ups per host (default 5)")
    args = ap.parse_args()
    n = args.hosts

    with tempfile.TemporaryDirectory(prefix="bench-certs-") as tmp:
        ca = load_or_create_ca(os.path.join(tmp, "ca"))
        store = CertStore(ca)
        try:
            hosts = [f"host{i}.bench.test" for i in range(n)]
            # warm up OpenSSL / cryptography code paths on a host that is not measured
            store.server_context("warmup.bench.test", ALPN)

            rows: list[tuple[str, list[float]]] = []
            rows.append(("first-seen host (leaf + SSLContext)",
                         [timed(store.server_context, h, ALPN) for h in hosts]))
            rows.append(("  mint leaf certificate (build + sign)",
                         [timed(store.leaf_cert, f"mint{i}.bench.test") for i in range(n)]))
            pem = store.leaf_cert("file.bench.test").public_bytes(serialization.Encoding.PEM)
            key_pem = store.leaf_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            scratch = os.path.join(tmp, "scratch")
            os.mkdir(scratch)

            def new_context(i: int) -> None:
                # what server_context does for a new host once the leaf exists
                path = os.path.join(scratch, f"leaf-{i}.pem")
                with open(path, "wb") as f:
                    f.write(key_pem + pem)
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(path)
                os.unlink(path)
                ctx.set_alpn_protocols(list(ALPN))

            rows.append(("  write key+leaf file, SSLContext, load, unlink",
                         [timed(new_context, i) for i in range(n)]))
            rows.append(("cached host (same ALPN offer)",
                         [timed(store.server_context, h, ALPN)
                          for _ in range(args.repeat) for h in hosts]))
            rows.append(("known host, new ALPN offer (new SSLContext)",
                         [timed(store.server_context, h, ("h2", "http/1.1")) for h in hosts]))

            client_ctx = ssl.create_default_context(cafile=ca.cert_path)
            ctxs = [store.server_context(h, ALPN) for h in hosts]
            rows.append(("for scale: full TLS handshake (in memory)",
                         [timed(handshake, c, client_ctx, h) for c, h in zip(ctxs, hosts,
                                                                          strict=True)]))
            assert store.minted == n + 1
        finally:
            store.close()

    print(f"dumpproxy CertStore, {n} hosts, Python {sys.version.split()[0]}, "
          f"{ssl.OPENSSL_VERSION}")
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  {'median us':>10}  {'p90 us':>10}  {'mean us':>10}  {'n':>5}")
    for name, samples in rows:
        med, p90, mean = stats(samples)
        print(f"{name:<{width}}  {med:>10.1f}  {p90:>10.1f}  {mean:>10.1f}  {len(samples):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
