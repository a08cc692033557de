"""Command line: options, validation (one-line errors, exit 2), and the run modes."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import ssl
import sys
import time
from typing import NoReturn

import orjson

from dumpproxy import __version__, allocator
from dumpproxy.certs import CAError, default_ca_dir, load_or_create_ca
from dumpproxy.config import Config
from dumpproxy.hostfilter import FilterSources, HostFilter, PatternError, exact_pattern
from dumpproxy.http1_wire import PARSER_ENV, choose_parser, parser_version
from dumpproxy.modespec import ModeError, ModeSpec, parse_mode
from dumpproxy.status import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

MODES = ("regular", "upstream:URL", "reverse:URL", "socks5", "transparent")
SHELLS = ("bash", "zsh", "fish")

USAGE = """\
dumpproxy [OPTIONS]                        run the proxy; events to stdout
       dumpproxy [OPTIONS] -- CMD [ARG...]        run CMD through the proxy (wrap mode)
       dumpproxy [OPTIONS] --check HOST:PORT...   print the decision for each target
       dumpproxy --pattern-for HOST:PORT          print the exact-match pattern
       dumpproxy [--ca-dir DIR] --print-ca        print the CA certificate
       dumpproxy --completions bash|zsh|fish      print a shell completion script
       dumpproxy --schema                         print the JSON Schema of the events
       dumpproxy har [FILE...]                    convert event streams to HAR 1.2
       dumpproxy egress [--fold-subdomains] FILE...  propose an egress allow file
       dumpproxy replay --list FILE...            show what replay files can serve"""

DESCRIPTION = """\
Intercepting HTTP(S) proxy that writes one JSON object per line for every event
(connections, TLS, requests, responses, intercept/passthrough decisions, errors).
Events go to stdout (or -o FILE); stderr is for humans.

With `-- CMD [ARG...]` (wrap mode) it runs CMD through the proxy on a free port,
with proxy and CA variables set, and exits with CMD's status.

`dumpproxy har [FILE...]` converts event streams to one HAR 1.2 document
(see `dumpproxy har --help`); `dumpproxy egress FILE...` proposes an egress allow
file from captures (--egress-allow-file). `--replay FILE` answers requests from a
capture instead of the network; `dumpproxy replay --list FILE...` shows what it can
serve. SIGHUP reloads the pattern files and reopens -o FILE."""

EPILOG = """\
examples:
  dumpproxy -p 8080 | jq -c 'select(.event=="response")'
  dumpproxy -o traffic.jsonl --ignore-hosts-file ignore.txt -- ./run-tests
  dumpproxy --ignore-hosts-file ignore.txt --check www.example.com:443

Full reference, event fields and more examples: see dumpproxy(1)."""

# Options whose value names a file or directory: an empty value is a mistake of its own.
PATH_OPTIONS = {
    "ignore_hosts_file": "--ignore-hosts-file",
    "allow_hosts_file": "--allow-hosts-file",
    "egress_allow_file": "--egress-allow-file",
    "egress_deny_file": "--egress-deny-file",
    "ca_dir": "--ca-dir",
    "upstream_ca": "--upstream-ca",
    "output": "--output",
    "replay": "--replay",
}


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `dumpproxy: error: ...`, exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        m = re.fullmatch(r"argument (\S+): expected (?:one|at least one) argument", message)
        if m:
            option = m.group(1).split("/")[-1]
            metavar = next((a.metavar for a in self._actions if option in a.option_strings),
                           None)
            message = f"{option}: missing value ({option} {metavar or 'VALUE'})"
        elif message.startswith("argument "):
            message = message[len("argument "):]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dumpproxy",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("listening")
    g.add_argument("--listen-host", metavar="HOST", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1)")
    g.add_argument("-p", "--listen-port", metavar="PORT", type=_port, default=None,
                   help="port; 0 picks a free one (default: 8080; wrap mode: 0)")
    g.add_argument("--mode", metavar="MODE", action="append", default=None,
                   help="regular (default), upstream:URL, reverse:URL, socks5, transparent; "
                        "repeatable, each with its own listener: MODE@PORT or "
                        "MODE@HOST:PORT")
    g.add_argument("--proxyauth", metavar="USER:PASS",
                   help="require proxy authentication (HTTP Basic; SOCKS5 user/pass)")
    f = p.add_argument_group("intercept or pass through")
    f.add_argument("--ignore-hosts", metavar="REGEX", action="append", default=[],
                   help="pass matching destinations through untouched; repeatable")
    f.add_argument("--allow-hosts", metavar="REGEX", action="append", default=[],
                   help="intercept only matching destinations; repeatable")
    f.add_argument("--ignore-hosts-file", metavar="FILE", action="append", default=[],
                   help="ignore patterns from FILE, one per line ('-' = stdin); repeatable")
    f.add_argument("--allow-hosts-file", metavar="FILE", action="append", default=[],
                   help="allow patterns from FILE, one per line ('-' = stdin); repeatable")
    e = p.add_argument_group("egress policy (what may be reached at all)")
    e.add_argument("--egress-allow", metavar="REGEX", action="append", default=[],
                   help="block every destination matching no egress allow pattern; "
                        "repeatable")
    e.add_argument("--egress-allow-file", metavar="FILE", action="append", default=[],
                   help="egress allow patterns from FILE, one per line ('-' = stdin); "
                        "repeatable")
    e.add_argument("--egress-deny", metavar="REGEX", action="append", default=[],
                   help="block matching destinations; repeatable")
    e.add_argument("--egress-deny-file", metavar="FILE", action="append", default=[],
                   help="egress deny patterns from FILE, one per line ('-' = stdin); "
                        "repeatable")
    e.add_argument("--egress-audit", action="store_true",
                   help="block nothing: decisions that would block say so (would_block)")
    f.add_argument("--check", metavar="HOST:PORT", nargs="+",
                   help="print the decision for each target ('-' = lines of stdin) and exit")
    f.add_argument("--pattern-for", metavar="HOST:PORT",
                   help="print the pattern matching exactly HOST:PORT and exit")
    f.add_argument("--peek-timeout", metavar="SECONDS", type=_positive_float, default=10.0,
                   help="how long to wait for a tunnel's first bytes before deciding "
                        "(default: 10)")
    w = p.add_argument_group("timeouts (seconds)")
    w.add_argument("--head-timeout", metavar="SECONDS", type=_positive_float, default=60.0,
                   help="a client's request head, or a tunnel's first byte (default: 60)")
    w.add_argument("--response-timeout", metavar="SECONDS", type=_positive_float,
                   default=60.0, help="the response head from the destination; then 504 "
                                      "(default: 60)")
    w.add_argument("--connect-timeout", metavar="SECONDS", type=_positive_float, default=30.0,
                   help="connecting (TCP and TLS) to the destination (default: 30)")
    w.add_argument("--idle-timeout", metavar="SECONDS", type=_positive_float, default=600.0,
                   help="no byte either way in a tunnel or body stream (default: 600)")
    w.add_argument("--pool-idle-timeout", metavar="SECONDS", type=_non_negative_float,
                   default=15.0, help="how long an idle upstream connection is kept for the "
                                      "next client (0: none kept; default: 15)")
    w.add_argument("--shutdown-grace", metavar="SECONDS", type=_non_negative_float,
                   default=5.0, help="on SIGINT/SIGTERM (or when CMD exits), how long "
                                     "exchanges in flight may finish (default: 5)")
    t = p.add_argument_group("TLS")
    t.add_argument("--ca-dir", metavar="DIR", default=None,
                   help="where the CA lives (default: $DUMPPROXY_HOME, else "
                        "$XDG_CONFIG_HOME/dumpproxy, else ~/.config/dumpproxy)")
    t.add_argument("--print-ca", action="store_true",
                   help="print the CA certificate (PEM), creating the CA if needed, and exit")
    t.add_argument("-k", "--ssl-insecure", action="store_true",
                   help="do not verify upstream certificates")
    t.add_argument("--upstream-ca", metavar="FILE",
                   help="extra CA bundle trusted for upstream servers")
    r = p.add_argument_group("wrap mode (-- CMD)")
    r.add_argument("--isolate", action="store_true",
                   help="run CMD in a network namespace of its own whose only way out is "
                        "dumpproxy: TCP through a transparent listener, DNS answered, "
                        "the rest refused (Linux)")
    r.add_argument("--no-browser-flags", action="store_true",
                   help="do not add the proxy and CA pin switches to a Chromium/Chrome "
                        "command")
    y = p.add_argument_group("replay (a capture as the origin)")
    y.add_argument("--replay", metavar="FILE", action="append", default=[],
                   help="answer intercepted requests from this capture (made with "
                        "--record-for-replay or --bodies) or HAR file; repeatable")
    y.add_argument("--replay-miss", choices=("refuse", "forward"), default=None,
                   help="a request not in the replay files: refuse (502 and an error; "
                        "default) or forward it to the real destination")
    y.add_argument("--replay-ignore-param", metavar="NAME", action="append", default=[],
                   help="query parameter left out when matching; repeatable")
    y.add_argument("--replay-ignore-body", action="store_true",
                   help="match requests without their bodies")
    y.add_argument("--record-for-replay", action="store_true",
                   help="record what replay needs: --bodies with no --max-body-bytes cap")
    o = p.add_argument_group("output")
    o.add_argument("--bodies", action="store_true",
                   help="include request/response bodies in response events")
    o.add_argument("--max-body-bytes", metavar="N", type=_count, default=65536,
                   help="cap on each body kept in an event (default: 65536)")
    o.add_argument("--no-redact", action="store_true",
                   help="show credential header values (authorization, cookie, ...)")
    o.add_argument("-o", "--output", metavar="FILE",
                   help="append events to FILE instead of stdout")
    o.add_argument("--format", choices=("json", "text"), default="json",
                   help="json (default) or text, the human event log")
    o.add_argument("--schema", action="store_true",
                   help="print the JSON Schema of the events (draft 2020-12) and exit")
    v = o.add_mutually_exclusive_group()
    v.add_argument("-q", "--quiet", action="store_true",
                   help="nothing on stderr but fatal errors (no line per error event)")
    v.add_argument("-v", "--verbose", action="store_true", help="more on stderr")
    m = p.add_argument_group("miscellaneous")
    m.add_argument("--completions", metavar="SHELL", choices=SHELLS,
                   help="print the completion script for SHELL (bash, zsh or fish) and exit")
    m.add_argument("--version", action="version",
                   version=f"dumpproxy {__version__} (HTTP/1 parser: {parser_version()})")
    return p


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0-65535)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid number {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (seconds > 0)")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (seconds >= 0)")
    return value


def _fail(message: str, status: int = EXIT_USAGE) -> int:
    print(f"dumpproxy: error: {message}", file=sys.stderr)
    return status


def _modes(args: argparse.Namespace, port: int) -> tuple[ModeSpec, ...]:
    """The --mode values, each a listener; two may not claim the same fixed address."""
    specs = []
    for value in args.mode or ["regular"]:
        try:
            specs.append(parse_mode(value))
        except ModeError as e:
            kind = value.split("@")[0].split(":")[0]
            known = [m.split(":")[0] for m in MODES]
            close = difflib.get_close_matches(kind, known, n=1)
            hint = f"; did you mean {close[0]}?" if close and kind not in known else ""
            raise UsageError(f"--mode: {e}{hint}") from None
    seen: dict[tuple[str, int], str] = {}
    for spec in specs:
        where = (spec.listen_host or args.listen_host,
                 spec.listen_port if spec.listen_port is not None else port)
        if where[1] != 0 and where in seen:
            raise UsageError(
                f"--mode: {seen[where]} and {spec.shown()} both listen on "
                f"{where[0]}:{where[1]}; give each its own port (MODE@PORT)")
        seen[where] = spec.shown()
    return tuple(specs)


def _config(args: argparse.Namespace, sources: FilterSources, wrap: bool) -> Config:
    port = args.listen_port if args.listen_port is not None else (0 if wrap else 8080)
    modes = _modes(args, port)
    if args.proxyauth is not None and ":" not in args.proxyauth:
        raise UsageError("--proxyauth: expected USER:PASS")
    if args.upstream_ca:
        try:
            ssl.create_default_context().load_verify_locations(cafile=args.upstream_ca)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or e
            raise UsageError(f"--upstream-ca: {args.upstream_ca}: {reason}") from None
    return Config(
        listen_host=args.listen_host,
        listen_port=port,
        modes=modes,
        sources=sources,
        peek_timeout=args.peek_timeout,
        head_timeout=args.head_timeout,
        response_timeout=args.response_timeout,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        shutdown_grace=args.shutdown_grace,
        pool_idle_timeout=args.pool_idle_timeout,
        ca_dir=args.ca_dir or default_ca_dir(),
        ssl_insecure=args.ssl_insecure,
        upstream_ca=args.upstream_ca,
        bodies=args.bodies or args.record_for_replay,
        max_body_bytes=sys.maxsize if args.record_for_replay else args.max_body_bytes,
        redact=not args.no_redact,
        proxyauth=args.proxyauth,
        output=args.output,
        format=args.format,
        verbosity=-1 if args.quiet else (1 if args.verbose else 0),
        browser_flags=not args.no_browser_flags,
        isolate=args.isolate,
    )


def check_targets(hf: HostFilter, targets: list[str]) -> int:
    from dumpproxy.addresses import split_host_port
    from dumpproxy.hostfilter import candidates

    if targets == ["-"]:
        targets = [line.strip() for line in sys.stdin if line.strip()]
    out = bytearray()
    for target in targets:
        try:
            host, port = split_host_port(target)
        except ValueError as e:
            return _fail(f"--check: {e}")
        # Only this target (no resolved ip, no SNI); an IPv6 one in both forms, as in traffic.
        d = hf.decide(candidates(host, port) if ":" in host else [target])
        # a decision event (valid against --schema) that no connection is tied to
        out += orjson.dumps(
            {"ts": round(time.time(), 6), "event": "decision", "address": target,
             **d.fields(), "sni": None, **d.extra_fields()},
            option=orjson.OPT_APPEND_NEWLINE,
        )
    sys.stdout.buffer.write(bytes(out))
    sys.stdout.flush()
    return EXIT_OK


def event_loop_runner():
    """uvloop when installed (markedly faster I/O), asyncio's own loop otherwise or when
    DUMPPROXY_LOOP=asyncio."""
    if os.environ.get("DUMPPROXY_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run
    return asyncio.run


# `dumpproxy NAME ...`, dispatched by main() before the options
SUBCOMMANDS = ("har", "egress", "replay")


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str],
                  command: list[str] | None) -> str:
    """The message for words argparse did not take: a misspelt option, or a command
    written without `--` before it."""
    word = extra[0]
    if word.startswith("-") and word != "-":
        name = word.split("=", 1)[0]
        options = [s[2:] for a in parser._actions for s in a.option_strings
                   if s.startswith("--")]
        close = difflib.get_close_matches(name.lstrip("-"), options, n=1, cutoff=0.7)
        hint = f"; did you mean --{close[0]}?" if close else "; see dumpproxy --help"
        return f"unrecognized option {name!r}{hint}"
    if word in SUBCOMMANDS:  # not a command to run: `-- har` would look for a program
        return (f"unexpected argument {word!r}: 'dumpproxy {word}' is a subcommand and comes "
                f"first, without the proxy's options: dumpproxy {' '.join(extra)}")
    if command is None:
        return (f"unexpected argument {word!r}; to run a command through the proxy, put "
                f"'--' before it: dumpproxy [OPTIONS] -- {' '.join(extra)}")
    return f"unexpected argument {word!r} before '--'"


def completion_script(shell: str) -> bytes:
    from dumpproxy.completions import script

    return script(shell)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["har"]:  # a subcommand with its own options (SUBCOMMANDS)
        from dumpproxy.har import main as har_main

        return har_main(argv[1:])
    if argv[:1] == ["egress"]:
        from dumpproxy.egress import main as egress_main

        return egress_main(argv[1:])
    if argv[:1] == ["replay"]:
        from dumpproxy.replaysource import main as replay_main

        return replay_main(argv[1:])
    try:
        choose_parser(os.environ.get(PARSER_ENV))
    except ValueError as e:
        return _fail(str(e))
    command: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
        if not command:
            return _fail("nothing to run after '--' (dumpproxy [OPTIONS] -- CMD [ARG...])")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(_unrecognized(parser, extra, command))
        _check_combinations(args, command)
    except UsageError as e:
        return _fail(str(e))
    if args.completions is not None:
        try:
            sys.stdout.buffer.write(completion_script(args.completions))
        except OSError as e:
            return _fail(f"--completions: cannot find the {args.completions} script: {e}",
                         EXIT_RUNTIME)
        sys.stdout.flush()
        return EXIT_OK
    if args.schema:
        from dumpproxy.schema import schema_text

        sys.stdout.buffer.write(schema_text())
        sys.stdout.flush()
        return EXIT_OK
    if args.pattern_for is not None:
        try:
            print(exact_pattern(args.pattern_for))
        except ValueError as e:
            return _fail(f"--pattern-for: {e}")
        return EXIT_OK
    stdin_users = (args.ignore_hosts_file + args.allow_hosts_file + args.egress_allow_file
                   + args.egress_deny_file).count("-") + (args.check == ["-"])
    if stdin_users > 1:
        return _fail("standard input ('-') can be used only once")
    sources = FilterSources(
        tuple(args.ignore_hosts), tuple(args.allow_hosts),
        tuple(args.ignore_hosts_file), tuple(args.allow_hosts_file),
        egress_allow_flags=tuple(args.egress_allow), egress_deny_flags=tuple(args.egress_deny),
        egress_allow_files=tuple(args.egress_allow_file),
        egress_deny_files=tuple(args.egress_deny_file), egress_audit=args.egress_audit,
    )
    try:
        sources = sources.with_stdin()
        hf = sources.load()
    except PatternError as e:
        return _fail(str(e))
    if args.check:
        return check_targets(hf, args.check)
    try:
        cfg = _config(args, sources, wrap=command is not None)
    except UsageError as e:
        return _fail(str(e))
    if args.replay:
        from dumpproxy.replaysource import ReplayFileError, load, startup_lines

        try:
            cfg.replay = load(args.replay, args.replay_ignore_param, args.replay_ignore_body,
                              args.replay_miss == "forward")
        except ReplayFileError as e:
            return _fail(str(e))
        if cfg.verbosity >= 0:
            for line in startup_lines(cfg.replay):
                print(f"dumpproxy: warning: {line}", file=sys.stderr)
    try:
        ca = load_or_create_ca(cfg.ca_dir)
    except CAError as e:
        return _fail(str(e), EXIT_RUNTIME)
    if args.print_ca:
        sys.stdout.buffer.write(ca.pem)
        sys.stdout.flush()
        return EXIT_OK
    if cfg.output:
        try:
            fd = os.open(cfg.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            return _fail(f"--output: {cfg.output}: {e.strerror}")
    else:
        fd = sys.stdout.fileno()
    from dumpproxy.runner import run

    allocator.tune()  # bulk chunks stay on the heap (see allocator.py)
    try:
        return event_loop_runner()(run(cfg, hf, ca, fd, command))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_INTERRUPTED


def _check_combinations(args: argparse.Namespace, command: list[str] | None) -> None:
    """Empty file names and options that make no sense together: one-line usage errors."""
    for dest, option in PATH_OPTIONS.items():
        value = getattr(args, dest)
        values = value if isinstance(value, list) else [value]
        if "" in values:
            raise UsageError(f"{option}: empty file name (give a path"
                             + (", or - for standard input)" if "hosts" in dest
                                or "egress" in dest else ")"))
    if args.egress_audit and not (args.egress_allow or args.egress_allow_file
                                  or args.egress_deny or args.egress_deny_file):
        raise UsageError("--egress-audit needs an egress list to audit (--egress-allow, "
                         "--egress-allow-file, --egress-deny or --egress-deny-file)")
    if command is None:
        for name, given in (("--isolate", args.isolate),
                            ("--no-browser-flags", args.no_browser_flags)):
            if given:
                raise UsageError(f"{name} is for wrap mode: dumpproxy {name} [OPTIONS] "
                                 "-- CMD [ARG...]")
    if not args.replay:
        for name, given in (("--replay-miss", args.replay_miss is not None),
                            ("--replay-ignore-param", bool(args.replay_ignore_param)),
                            ("--replay-ignore-body", args.replay_ignore_body)):
            if given:
                raise UsageError(f"{name} is for replay: dumpproxy --replay FILE {name} ...")
    exits_at_once = [name for name, given in (
        ("--completions", args.completions is not None),
        ("--schema", args.schema),
        ("--pattern-for", args.pattern_for is not None),
        ("--check", bool(args.check)),
        ("--print-ca", args.print_ca),
    ) if given]
    if len(exits_at_once) > 1:
        raise UsageError(f"{exits_at_once[0]} cannot be combined with {exits_at_once[1]}")
    if exits_at_once:
        what = exits_at_once[0]
        if command is not None:
            raise UsageError(f"{what} cannot be combined with '-- {command[0]}': it prints "
                             f"and exits without running a command")
        if args.mode is not None and what != "--print-ca":
            raise UsageError(f"{what} cannot be combined with --mode: it uses no listener")
