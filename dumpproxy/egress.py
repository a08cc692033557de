"""`dumpproxy egress FILE...`: the destinations a capture reached, as an egress allow file.

Every destination a `decision` names (a blocked one excepted: it was not reached) becomes
one exact pattern (`--pattern-for`'s form), sorted, with its count and first time as `#`
comments, to review and commit, then pass to `--egress-allow-file`. A destination known by
its address only is named by the client's SNI when it sent one (the verdict on such a
destination takes its SNI and Host as candidates). `--fold-subdomains` makes one pattern
of the names under one registrable domain (the Public Suffix List, through the
`publicsuffixlist` package: `a.example.co.uk` and `b.example.co.uk` are one site,
`a.co.uk` and `b.co.uk` are not).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dumpproxy.addresses import is_ip, join_host_port, split_host_port
from dumpproxy.captures import Skipped, open_captures
from dumpproxy.hostfilter import exact_pattern


@dataclass
class Seen:
    """A destination in the capture: how often it was decided, and first when."""

    count: int
    first: float


def destination(ev: dict) -> str | None:
    """The host:port a `decision` event lets out (None: not one, or blocked)."""
    if ev.get("event") != "decision" or ev.get("action") == "block":
        return None
    address = ev.get("address")
    if not isinstance(address, str):
        return None
    try:
        host, port = split_host_port(address)
    except ValueError:
        return None
    sni = ev.get("sni")
    if is_ip(host) and isinstance(sni, str) and sni:
        return join_host_port(sni, port)
    return join_host_port(host, port)


def collect(events: Iterable[dict], seen: dict[str, Seen]) -> None:
    for ev in events:
        dest = destination(ev)
        if dest is None:
            continue
        ts = ev.get("ts")
        ts = float(ts) if isinstance(ts, (int, float)) else 0.0
        s = seen.get(dest)
        if s is None:
            seen[dest] = Seen(1, ts)
        else:
            s.count += 1
            s.first = min(s.first, ts)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _comment(count: int, first: float, what: str = "") -> str:
    return f"# {count} decision{'s' if count != 1 else ''}, first {_when(first)}{what}"


def registrable(host: str) -> str | None:
    """The registrable domain of a name (None: an address, or a public suffix itself)."""
    if is_ip(host):
        return None
    return _suffix_list().privatesuffix(host.lower().rstrip("."))


@functools.lru_cache(maxsize=1)
def _suffix_list():
    from publicsuffixlist import PublicSuffixList  # the list is parsed on first use only

    return PublicSuffixList()


def fold_pattern(domain: str, port: int) -> str:
    """A pattern for the domain and every name under it, on this port."""
    return "^(?:[^:]+\\.)?" + re.escape(join_host_port(domain, port)) + "$"


def propose(seen: dict[str, Seen], fold: bool = False) -> list[str]:
    """The allow file's lines: for each destination (or folded domain), its comment and
    its pattern, sorted by host:port."""
    groups: dict[str, list[str]] = {}  # key (a destination, or "domain:port") -> members
    for dest in seen:
        key = dest
        if fold:
            host, port = split_host_port(dest)
            domain = registrable(host)
            if domain is not None:
                key = join_host_port(domain, port)
        groups.setdefault(key, []).append(dest)
    entries: list[tuple[tuple[str, int], list[str]]] = []
    for key, members in groups.items():
        members.sort()
        count = sum(seen[m].count for m in members)
        first = min(seen[m].first for m in members)
        if len(members) == 1:  # nothing to fold: exact
            key = members[0]
            lines = [_comment(count, first), exact_pattern(key)]
        else:
            host, port = split_host_port(key)
            lines = [_comment(count, first, f": {', '.join(members)}"),
                     fold_pattern(host, port)]
        host, port = split_host_port(key)
        entries.append(((host.lower(), port), lines))
    return [line for _, lines in sorted(entries) for line in lines]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dumpproxy egress",
        description="Print an egress allow file (for --egress-allow-file) from captures: "
                    "one exact pattern per destination the capture reached, sorted, with "
                    "its count and first time as # comments.")
    p.add_argument("files", metavar="FILE", nargs="+",
                   help="captures (JSON lines), read in order as one stream ('-': stdin)")
    p.add_argument("--fold-subdomains", action="store_true",
                   help="one pattern for the names under one registrable domain (Public "
                        "Suffix List)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.files.count("-") > 1:
        print("dumpproxy: error: standard input ('-') can be read only once", file=sys.stderr)
        return 2
    skipped = Skipped()
    inputs = open_captures(args.files, skipped)
    if isinstance(inputs, int):
        return inputs
    seen: dict[str, Seen] = {}
    try:
        for inp in inputs:
            if inp.empty:
                print(f"dumpproxy: error: {inp.name}: no events (an empty capture)",
                      file=sys.stderr)
                return 2
            try:
                collect(inp.events(), seen)
            except OSError as e:
                print(f"dumpproxy: error: {inp.name}: {e.strerror or e}", file=sys.stderr)
                return 1
    finally:
        for inp in inputs:
            inp.close()
    head = [f"# egress allow file made by dumpproxy egress from {', '.join(args.files)}: "
            f"{len(seen)} destinations",
            "# review, then: dumpproxy --egress-allow-file FILE ..."]
    if skipped.count:
        head.append(f"# {skipped.count} input lines skipped")
    try:
        sys.stdout.write("\n".join(head + propose(seen, args.fold_subdomains)) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return 0
    return 0
