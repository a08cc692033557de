"""The egress policy's pure parts: the rule, the decision fields, the text format, the
proposed allow file (with folding), and the command line (`--check`, option mistakes,
`dumpproxy egress`). No sockets; the real clients are in test_egress_clients.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import parse_events, run_cli
from examples import clean_env, example, make_bin_dir, run_bash, run_in_sandbox

from dumpproxy.egress import Seen, destination, fold_pattern, propose
from dumpproxy.hostfilter import FilterSources, compile_pattern
from dumpproxy.status import EXIT_BLOCKED, EXIT_STATUSES
from dumpproxy.textformat import format_text


def policy(allow=(), deny=(), allow_files=(), deny_files=(), audit=False, ignore=()):
    return FilterSources(ignore_flags=tuple(ignore), egress_allow_flags=tuple(allow),
                         egress_deny_flags=tuple(deny), egress_allow_files=tuple(allow_files),
                         egress_deny_files=tuple(deny_files), egress_audit=audit).load()


# --------------------------------------------------------------------------- the rule


def test_no_egress_lists_no_verdict_and_decisions_unchanged():
    f = policy(ignore=[r"^i\.test:"])
    assert not f.egress_on
    d = f.decide(["i.test:443"])
    assert (d.action, d.reason, d.egress) == ("passthrough", "ignore_hosts", None)
    assert d.extra_fields() == {}


def test_allow_list_blocks_what_matches_none(tmp_path: Path):
    allow = tmp_path / "egress.txt"
    allow.write_text("# our hosts\n^pypi\\.test:443$\n^files\\.test:443$\n")
    f = policy(allow_files=[str(allow)])
    ok = f.egress(["files.test:443"])
    assert (ok.blocked, ok.reason, ok.pattern, ok.source, ok.matched) == (
        False, "egress_allow", r"^files\.test:443$", f"{allow}:3", "files.test:443")
    no = f.egress(["cdn.test:443"])
    assert (no.blocked, no.reason, no.pattern, no.source) == (
        True, "egress_allow", None, str(allow))
    assert no.why("cdn.test:443") == f"cdn.test:443 matches no egress allow pattern ({allow})"
    d = f.decide(["cdn.test:443"])
    assert (d.action, d.reason, d.source, d.candidates) == (
        "block", "egress_allow", str(allow), ("cdn.test:443",))
    assert d.extra_fields() == {}  # a block says it in its own fields


def test_deny_wins_over_allow_and_names_its_line(tmp_path: Path):
    deny = tmp_path / "deny.txt"
    deny.write_text("\n^evil\\.corp\\.test:\n")
    f = policy(allow=[r"\.corp\.test:"], deny_files=[str(deny)])
    v = f.egress(["evil.corp.test:443"])
    assert (v.blocked, v.reason, v.source) == (True, "egress_deny", f"{deny}:2")
    assert "matches egress deny pattern" in v.refusal("evil.corp.test:443")
    v = f.egress(["ok.corp.test:443"])
    assert (v.blocked, v.reason, v.source) == (False, "egress_allow", "--egress-allow")


def test_deny_only_lets_the_rest_out():
    f = policy(deny=[r"^10\."])
    v = f.egress(["example.test:443"])
    assert (v.blocked, v.reason, v.pattern) == (False, "default", None)
    assert f.egress(["10.1.2.3:443"]).blocked


def test_an_empty_allow_file_blocks_everything(tmp_path: Path):
    empty = tmp_path / "egress.txt"
    empty.write_text("# nothing allowed yet\n")
    f = policy(allow_files=[str(empty)])
    assert f.egress_on
    assert f.egress(["anything.test:443"]).blocked


def test_any_candidate_lets_an_address_out():
    """A destination known by address: its SNI/Host are candidates too (the client's word)."""
    f = policy(allow=[r"^api\.test:443$"])
    assert not f.egress(["10.0.0.7:443", "api.test:443"]).blocked
    assert f.egress(["10.0.0.7:443", "other.test:443"]).blocked


def test_egress_comes_before_the_intercept_rule():
    f = policy(allow=[r"^a\.test:"], ignore=[r"^a\.test:", r"^b\.test:"])
    d = f.decide(["a.test:443"])
    assert (d.action, d.reason) == ("passthrough", "ignore_hosts")
    assert d.extra_fields() == {"egress_reason": "egress_allow", "egress_pattern": r"^a\.test:",
                                "egress_source": "--egress-allow"}
    d = f.decide(["b.test:443"])  # ignored, but not allowed out: blocked
    assert (d.action, d.reason) == ("block", "egress_allow")


def test_audit_blocks_nothing_and_says_would_block():
    f = policy(allow=[r"^a\.test:"], audit=True)
    d = f.decide(["b.test:443"])
    assert d.action == "intercept"
    assert d.extra_fields() == {"egress_reason": "egress_allow", "egress_pattern": None,
                                "egress_source": "--egress-allow", "would_block": True}
    assert not f.decide(["a.test:443"]).extra_fields().get("would_block")


def test_a_slow_egress_pattern_blocks():
    f = policy(allow=["(a|aa)+$"])
    v = f.egress(["a" * 40 + "b:443"])
    assert (v.blocked, v.reason, v.pattern) == (True, "timeout", "(a|aa)+$")


def test_reload_sees_the_new_egress_file(tmp_path: Path):
    allow = tmp_path / "egress.txt"
    allow.write_text("^a\\.test:443$\n")
    sources = FilterSources(egress_allow_files=(str(allow),))
    assert sources.load().egress(["b.test:443"]).blocked
    allow.write_text("^a\\.test:443$\n^b\\.test:443$\n")
    assert sources.load().egress(["b.test:443"]).source == f"{allow}:2"


# --------------------------------------------------------------------------- text format


def test_text_format_of_block_and_audit():
    block = {"event": "decision", "client": "127.0.0.1:5", "address": "cdn.test:443",
             "action": "block", "reason": "egress_allow", "pattern": None,
             "source": "egress.txt"}
    assert format_text(block) == "127.0.0.1:5: block cdn.test:443 (egress_allow egress.txt)\n"
    audit = {"event": "decision", "address": "cdn.test:443", "action": "intercept",
             "reason": "default", "pattern": None, "source": None,
             "egress_reason": "egress_allow", "would_block": True}
    assert format_text(audit) == "intercept cdn.test:443 (default; would block: egress_allow)\n"
    shutdown = {"event": "shutdown", "reason": "SIGTERM", "connections": 2, "requests": 1,
                "passthrough": 0, "errors": 0, "blocked": 1, "would_block": 0}
    assert format_text(shutdown).endswith("0 errors, 1 blocked, 0 would block\n")


# --------------------------------------------------------------------------- the proposed file


def test_destination_of_decisions():
    assert destination({"event": "decision", "address": "a.test:443", "action": "intercept",
                        "sni": None}) == "a.test:443"
    # known by address, named by its SNI
    assert destination({"event": "decision", "address": "10.0.0.1:443",
                        "action": "passthrough", "sni": "a.test"}) == "a.test:443"
    assert destination({"event": "decision", "address": "[::1]:80", "action": "intercept",
                        "sni": None}) == "[::1]:80"
    # blocked: not reached, not proposed
    assert destination({"event": "decision", "address": "b.test:443", "action": "block",
                        "sni": None}) is None
    assert destination({"event": "request", "address": "a.test:443"}) is None


def test_propose_is_sorted_with_counts_and_first_seen():
    seen = {"b.test:443": Seen(2, 1_700_000_100.0), "a.test:8443": Seen(1, 1_700_000_000.0),
            "[::1]:80": Seen(1, 1_700_000_000.0)}
    lines = propose(seen)
    assert lines == [
        "# 1 decision, first 2023-11-14T22:13:20Z", r"^\[::1\]:80$",
        "# 1 decision, first 2023-11-14T22:13:20Z", r"^a\.test:8443$",
        "# 2 decisions, first 2023-11-14T22:15:00Z", r"^b\.test:443$",
    ]
    pats = [compile_pattern(x, "t") for x in lines if not x.startswith("#")]
    for dest in seen:
        assert sum(bool(p.regex.search(dest)) for p in pats) == 1


def test_fold_subdomains_by_the_public_suffix_list():
    seen = {"a.cdn.test:443": Seen(1, 10.0), "b.cdn.test:443": Seen(3, 5.0),
            "x.example.co.uk:443": Seen(1, 1.0), "y.example.co.uk:443": Seen(1, 2.0),
            # co.uk is a public suffix: these two are different sites, not folded
            "one.co.uk:443": Seen(1, 1.0), "two.co.uk:443": Seen(1, 1.0),
            "solo.other.test:443": Seen(1, 1.0), "10.0.0.1:443": Seen(1, 1.0),
            "a.cdn.test:80": Seen(1, 1.0)}
    lines = propose(seen, fold=True)
    patterns = [x for x in lines if not x.startswith("#")]
    assert patterns == [
        r"^10\.0\.0\.1:443$", r"^a\.cdn\.test:80$", fold_pattern("cdn.test", 443),
        fold_pattern("example.co.uk", 443), r"^one\.co\.uk:443$",
        r"^solo\.other\.test:443$", r"^two\.co\.uk:443$"]
    assert "# 4 decisions, first 1970-01-01T00:00:05Z: a.cdn.test:443, b.cdn.test:443" in lines
    folded = re.compile(fold_pattern("cdn.test", 443), re.I)
    assert folded.search("new.cdn.test:443") and folded.search("cdn.test:443")
    assert not folded.search("evilcdn.test:443") and not folded.search("a.cdn.test:4433")


# --------------------------------------------------------------------------- the command line


def test_check_prints_block_decisions(tmp_path: Path):
    allow = tmp_path / "egress.txt"
    allow.write_text("^pypi\\.test:443$\n")
    r = run_cli("--egress-allow-file", str(allow), "--egress-deny", "^evil",
                "--check", "pypi.test:443", "cdn.test:443", "evil.test:443")
    assert r.returncode == 0, r.stderr
    rows = parse_events(r.stdout)  # valid against the schema (conftest)
    assert [(d["action"], d["reason"], d["source"]) for d in rows] == [
        ("intercept", "default", None), ("block", "egress_allow", str(allow)),
        ("block", "egress_deny", "--egress-deny")]
    assert (rows[0]["egress_reason"], rows[0]["egress_source"]) == (
        "egress_allow", f"{allow}:1")
    assert "egress_reason" not in rows[1]


def test_option_mistakes(tmp_path: Path):
    bad = tmp_path / "egress.txt"
    bad.write_text("ok\n\nfoo(\n")
    cases = [
        (["--egress-allow-file", str(bad), "--check", "a:1"], f"{bad}:3: invalid pattern"),
        (["--egress-deny", "(", "--check", "a:1"], "--egress-deny: invalid pattern '('"),
        (["--egress-allow-file", str(tmp_path / "missing.txt"), "--check", "a:1"],
         "missing.txt: cannot read"),
        (["--egress-allow-file", "", "--check", "a:1"], "--egress-allow-file: empty file name"),
        (["--egress-audit", "--check", "a:1"], "--egress-audit needs an egress list"),
        (["--egress-alow", "x", "--check", "a:1"], "did you mean --egress-allow"),
        (["--egress-allow-file", "-", "--egress-deny-file", "-", "--check", "a:1"],
         "standard input ('-') can be used only once"),
    ]
    for args, message in cases:
        r = run_cli(*args, stdin=b"")
        err = r.stderr.decode()
        assert r.returncode == 2, (args, err)
        assert err.count("\n") == 1 and message in err, (args, err)
        assert "Traceback" not in err


def test_exit_status_3_is_documented():
    assert EXIT_BLOCKED == 3 and EXIT_BLOCKED in EXIT_STATUSES


def write_capture(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def test_egress_subcommand_reads_rotated_files_in_order(tmp_path: Path):
    old = write_capture(tmp_path / "cap.jsonl.1", [
        {"ts": 100.0, "event": "decision", "address": "b.test:443", "action": "intercept",
         "sni": None},
        {"ts": 101.0, "event": "decision", "address": "a.test:443", "action": "passthrough",
         "sni": None}])
    new = tmp_path / "cap.jsonl"
    new.write_text(json.dumps({"ts": 200.0, "event": "decision", "address": "b.test:443",
                               "action": "intercept", "sni": None}) + "\nnot json\n"
                   + json.dumps({"ts": 201.0, "event": "decision", "address": "c.test:443",
                                 "action": "block", "sni": None}) + "\n")
    r = run_cli("egress", str(old), str(new))
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode() == f"dumpproxy: warning: {new}:2: not a JSON line, skipped\n"
    lines = r.stdout.decode().splitlines()
    body = [x for x in lines if not x.startswith("# egress allow") and not x.startswith(
        "# review") and not x.startswith("# 1 input")]
    assert body == ["# 1 decision, first 1970-01-01T00:01:41Z", r"^a\.test:443$",
                    "# 2 decisions, first 1970-01-01T00:01:40Z", r"^b\.test:443$"]
    # the file is an egress allow file as it stands
    out = tmp_path / "egress.txt"
    out.write_bytes(r.stdout)
    r = run_cli("--egress-allow-file", str(out), "--check", "b.test:443", "c.test:443")
    assert [d["action"] for d in parse_events(r.stdout)] == ["intercept", "block"]


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_egress_subcommand_refuses_a_file_without_events(tmp_path: Path, content: bytes):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    r = run_cli("egress", str(empty))
    assert r.returncode == 2
    assert r.stderr.decode() == f"dumpproxy: error: {empty}: no events (an empty capture)\n"
    assert r.stdout == b""


def test_egress_subcommand_refuses_a_har_file(tmp_path: Path):
    har = tmp_path / "x.har"
    har.write_text('{"log": {}}\n')
    r = run_cli("egress", str(har))
    assert r.returncode == 2
    assert "not a dumpproxy capture" in r.stderr.decode() and r.stdout == b""


# --------------------------------------------------------------------------- man page examples


def test_example_egress_file(tmp_path: Path):
    """The allow file as the man page shows it: its patterns, their lines."""
    f = tmp_path / "egress.txt"
    f.write_text(example("egress-file").text)
    r = run_cli("--egress-allow-file", str(f), "--check", "pypi.org:443",
                "files.pythonhosted.org:443", "api.github.com:443", "github.com:443",
                "github.com.evil.test:443", "pypi.org:80")
    rows = parse_events(r.stdout)
    assert [(d["action"], d.get("egress_source") or d["source"]) for d in rows] == [
        ("intercept", f"{f}:2"), ("intercept", f"{f}:3"), ("intercept", f"{f}:4"),
        ("intercept", f"{f}:4"), ("block", str(f)), ("block", str(f))]


def test_example_egress_lists(tmp_path: Path):
    bin_dir = make_bin_dir(tmp_path / "bin")
    work = tmp_path / "w"
    work.mkdir()
    (work / "egress.txt").write_text(example("egress-file").text)
    text = example("egress-lists").text
    (work / "example.sh").write_text(text)
    r = run_bash(["-eu", "-o", "pipefail", "example.sh"], cwd=work,
                 env=clean_env(tmp_path, bin_dir))
    assert r.returncode == 0, r.stderr
    expected = [line[2:].split() for line in text.splitlines() if line.startswith("# ")]
    assert [line.split("\t") for line in r.stdout.splitlines()] == expected


def test_example_egress_workflow(tmp_path, pki):
    job = ("#!/bin/sh\nset -e\ncurl -sS -o /dev/null https://example.com/\n"
           "curl -sS -o /dev/null http://example.org/\n")
    r, work = run_in_sandbox(tmp_path, pki, 'bash -eu -o pipefail "$WORK/example.sh"',
                             files={"example.sh": example("egress-workflow").text,
                                    "ci-job": job})
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.stdout == ""  # the audit found nothing that would be blocked
    allow = (work / "egress.txt").read_text().splitlines()
    assert [x for x in allow if not x.startswith("#")] == [
        r"^example\.com:443$", r"^example\.org:80$"]
    enforced = parse_events((work / "enforced.jsonl").read_text())
    decisions = [(d["address"], d["action"], d["egress_source"]) for d in enforced
                 if d["event"] == "decision"]
    assert decisions == [("example.com:443", "intercept", "egress.txt:4"),
                         ("example.org:80", "intercept", "egress.txt:6")]
    assert [e["status"] for e in enforced if e["event"] == "response"] == [200, 200]
    assert enforced[-1]["blocked"] == 0


# --------------------------------------------------------------------------- completions


@pytest.mark.parametrize("shell", ["bash", "bash-without-bash-completion", "zsh", "fish"])
def test_completions_offer_the_egress_subcommand_and_its_option(shell, tmp_path):
    from test_cli_docs import CHECKOUT, complete, names

    assert "egress" in names(complete(CHECKOUT, shell, "dumpproxy eg", tmp_path))
    got = names(complete(CHECKOUT, shell, "dumpproxy egress --fo", tmp_path))
    assert "--fold-subdomains" in got, got
    (tmp_path / "run.jsonl").write_text("")
    got = names(complete(CHECKOUT, shell, f"dumpproxy egress {tmp_path}/ru", tmp_path))
    assert "run.jsonl" in got, got
    got = names(complete(CHECKOUT, shell, "dumpproxy --egress-", tmp_path))
    assert {"--egress-allow", "--egress-allow-file", "--egress-deny", "--egress-deny-file",
            "--egress-audit"} <= got, got


def test_egress_subcommand_option_mistakes(tmp_path: Path):
    cap = write_capture(tmp_path / "cap.jsonl", [
        {"ts": 1.0, "event": "decision", "address": "a.test:443", "action": "intercept",
         "sni": None}])
    for args, message in ((["--flod-subdomains", str(cap)],
                           "unrecognized arguments: --flod-subdomains"),
                          ([], "the following arguments are required: FILE"),
                          ([str(tmp_path / "missing.jsonl")], "missing.jsonl: No such file"),
                          (["-", "-"], "standard input ('-') can be read only once")):
        r = run_cli("egress", *args, stdin=b"")
        err = r.stderr.decode()
        assert r.returncode == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert r.stdout == b""
