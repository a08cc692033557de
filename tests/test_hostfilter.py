"""Unit tests of dumpproxy.hostfilter: candidates, host:port syntax, patterns, the rule.

Pure functions only (no processes, no sockets); the whole file runs in well under a second.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from dumpproxy.hostfilter import (
    CHUNK,
    FilterSources,
    HostFilter,
    Pattern,
    PatternError,
    PatternList,
    candidates,
    compile_pattern,
    exact_pattern,
    join_host_port,
    parse_pattern_lines,
    read_pattern_file,
    split_host_port,
)

# --------------------------------------------------------------------------- helpers


def plist(*texts: str, source: str = "--ignore-hosts") -> PatternList:
    return PatternList([compile_pattern(t, source) for t in texts])


def hf(allow: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> HostFilter:
    return FilterSources(ignore_flags=ignore, allow_flags=allow).load()


def matches(pattern: str, candidate: str) -> bool:
    """Does `pattern` decide `candidate` through the real code path (PatternList)?"""
    return plist(pattern).first_match(candidate) is not None


def naive_first(patterns: list[Pattern], candidate: str) -> Pattern | None:
    return next((p for p in patterns if p.regex.search(candidate)), None)


# --------------------------------------------------------------------------- candidates


def test_candidates_order_ip_host_sni_host_header():
    assert candidates("example.com", 443, ip="93.184.216.34", sni="www.example.com",
                      host_header="api.example.com") == [
        "93.184.216.34:443", "example.com:443", "www.example.com:443", "api.example.com:443",
    ]


def test_candidates_host_only():
    assert candidates("example.com", 8443) == ["example.com:8443"]


def test_candidates_are_unique_and_keep_first_position():
    # CONNECT 127.0.0.1:443: the resolved ip and the logical host are the same string
    assert candidates("127.0.0.1", 443, ip="127.0.0.1") == ["127.0.0.1:443"]
    assert candidates("example.com", 443, ip="127.0.0.1", sni="example.com",
                      host_header="example.com") == ["127.0.0.1:443", "example.com:443"]
    assert candidates("a.test", 80, ip="127.0.0.1", sni="b.test", host_header="a.test") == [
        "127.0.0.1:80", "a.test:80", "b.test:80"]


def test_candidates_host_header_port_appended_or_kept():
    assert candidates("127.0.0.1", 80, host_header="other.test") == [
        "127.0.0.1:80", "other.test:80"]
    assert candidates("127.0.0.1", 80, host_header="other.test:8080") == [
        "127.0.0.1:80", "other.test:8080"]


def test_candidates_empty_sni_and_host_header_are_skipped():
    assert candidates("example.com", 443, sni="", host_header="") == ["example.com:443"]
    assert candidates("example.com", 443, sni=None, host_header=None) == ["example.com:443"]


def test_candidates_ipv6_twin_forms_bracketed_first():
    assert candidates("2001:db8::1", 443) == ["[2001:db8::1]:443", "2001:db8::1:443"]
    assert candidates("[2001:db8::1]", 443) == ["[2001:db8::1]:443", "2001:db8::1:443"]


def test_candidates_ipv6_everywhere():
    assert candidates("example.com", 443, ip="2001:db8::1", sni="www.example.com",
                      host_header="[2001:db8::2]:8080") == [
        "[2001:db8::1]:443", "2001:db8::1:443",
        "example.com:443",
        "www.example.com:443",
        "[2001:db8::2]:8080", "2001:db8::2:8080",
    ]
    # a bracketed Host header without a port gets the destination port
    assert candidates("::1", 8443, ip="::1", host_header="[::1]") == ["[::1]:8443", "::1:8443"]


def test_candidates_ipv4_has_no_twin():
    assert candidates("10.0.0.1", 443, ip="10.0.0.1") == ["10.0.0.1:443"]


# --------------------------------------------------------------------------- host:port


@pytest.mark.parametrize("text, expected", [
    ("example.com:443", ("example.com", 443)),
    ("  example.com:443\n", ("example.com", 443)),
    ("EXAMPLE.com:1", ("EXAMPLE.com", 1)),
    ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ("[::1]:443", ("::1", 443)),
    ("[2001:db8::1]:8443", ("2001:db8::1", 8443)),
    ("2001:db8::1:443", ("2001:db8::1", 443)),  # bare IPv6: the last colon is the port's
])
def test_split_host_port(text, expected):
    assert split_host_port(text) == expected


def test_split_host_port_default_port():
    assert split_host_port("example.com", default_port=80) == ("example.com", 80)
    assert split_host_port("example.com:", default_port=80) == ("example.com", 80)
    assert split_host_port("[::1]", default_port=8080) == ("::1", 8080)
    assert split_host_port("example.com:8080", default_port=80) == ("example.com", 8080)


@pytest.mark.parametrize("text", [
    "example.com",  # no port
    "example.com:",
    ":443",  # no host
    "[]:443",
    "example.com:0",
    "example.com:65536",
    "example.com:-1",
    "example.com:+443",
    "example.com:44 3",
    "example.com:https",
    "example.com:\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() but not a port
    "example.com:\u00b2",  # SUPERSCRIPT TWO
    "[::1",
    "[::1]443",
    "[::1]x:443",
])
def test_split_host_port_rejects(text):
    with pytest.raises(ValueError):
        split_host_port(text)


@pytest.mark.parametrize("host, port, expected", [
    ("example.com", 443, "example.com:443"),
    ("127.0.0.1", 80, "127.0.0.1:80"),
    ("::1", 443, "[::1]:443"),
    ("[::1]", 443, "[::1]:443"),
    ("2001:db8::1", 8443, "[2001:db8::1]:8443"),
])
def test_join_host_port(host, port, expected):
    assert join_host_port(host, port) == expected


@pytest.mark.parametrize("target", ["example.com:443", "[2001:db8::1]:443", "10.1.2.3:8080"])
def test_split_join_round_trip(target):
    assert join_host_port(*split_host_port(target)) == target


# --------------------------------------------------------------------------- exact_pattern


def test_exact_pattern_docs_example():
    assert exact_pattern("example.com:443") == r"^example\.com:443$"


METACHARS = ".^$*+?{}[]\\|()-#&~ "


@pytest.mark.parametrize("char", list(METACHARS))
def test_exact_pattern_escapes_every_metachar(char):
    host = f"a{char}b.test"
    target = f"{host}:443"
    pattern = exact_pattern(target)
    assert re.fullmatch(pattern, target)
    assert matches(pattern, target)
    assert matches(pattern, target.upper())  # case-insensitive, like every pattern
    for variant in ("aXb.test:443", "ab.test:443", f"a{char}{char}b.test:443",
                    f"x{target}", f"{target}3", f"{host}:4430"):
        if variant != target:
            assert not matches(pattern, variant), (pattern, variant)


def test_exact_pattern_with_all_metachars_at_once():
    host = "w" + METACHARS + "z"
    target = f"{host}:8443"
    pattern = exact_pattern(target)
    assert matches(pattern, target)
    assert not matches(pattern, f"w{METACHARS[1:]}z:8443")
    assert not matches(pattern, f"{host}:844")


def test_exact_pattern_dot_is_literal():
    pattern = exact_pattern("my-host.example.com:443")
    assert matches(pattern, "my-host.example.com:443")
    assert not matches(pattern, "myXhost.example.com:443")
    assert not matches(pattern, "my-hostXexample.com:443")
    assert not matches(pattern, "www.my-host.example.com:443")
    assert not matches(pattern, "my-host.example.com:4430")


@pytest.mark.parametrize("target", ["[2001:db8::1]:443", "2001:db8::1:443"])
def test_exact_pattern_ipv6_is_bracketed(target):
    pattern = exact_pattern(target)
    assert pattern == r"^\[2001:db8::1\]:443$"
    # it matches the bracketed twin of every IPv6 candidate list
    hit = plist(pattern).search(candidates("2001:db8::1", 443))
    assert hit is not None and hit[1] == "[2001:db8::1]:443"
    assert plist(pattern).search(candidates("2001:db8::1", 4430)) is None
    assert plist(pattern).search(candidates("2001:db8::11", 443)) is None


def test_exact_pattern_rejects_bad_targets():
    for bad in ("example.com", "example.com:0", "[::1"):
        with pytest.raises(ValueError):
            exact_pattern(bad)


def test_exact_pattern_survives_a_pattern_file(tmp_path: Path):
    # `--pattern-for X >> ignore.txt` must give back a pattern for X, even with '#' / spaces
    targets = ["#hash.test:443", " sp.test:443", "a b.test:80", "[::1]:443"]
    f = tmp_path / "ignore.txt"
    f.write_text("".join(exact_pattern(t) + "\n" for t in targets))
    pats = read_pattern_file(str(f))
    assert [p.text for p in pats] == [exact_pattern(t) for t in targets]
    for p, t in zip(pats, targets, strict=True):
        host, port = split_host_port(t)
        assert PatternList([p]).search(candidates(host, port)) is not None


# --------------------------------------------------------------------------- PatternList


def test_first_match_is_first_in_list_order():
    pl = plist(r"example", r"example\.com", r"", source="--ignore-hosts")
    assert pl.first_match("www.example.com:443").text == "example"
    assert plist(r"example\.com", r"example").first_match("example.com:1").text == r"example\.com"


def test_search_uses_first_matching_candidate_then_first_pattern():
    pl = plist(r"b\.test", r"a\.test")
    p, c = pl.search(["a.test:1", "b.test:1"])
    assert (p.text, c) == (r"a\.test", "a.test:1")  # candidate order beats pattern order
    assert pl.search(["c.test:1"]) is None
    assert plist().search(["a.test:1"]) is None


def test_empty_pattern_matches_everything():
    pl = plist("")
    for c in ("example.com:443", "[::1]:1", "x:2", ""):
        assert pl.first_match(c).text == ""


def test_empty_list_is_falsy():
    assert not plist()
    assert len(plist()) == 0
    assert plist("a") and len(plist("a", "b")) == 2


SPECIALS = [
    # (pattern, a candidate only it matches)
    (r"^(grp|alt)\.special:1$", "alt.special:1"),
    (r"^(?P<name>named)\.special:1$", "named.special:1"),
    (r"^(\w)\1x\.special:1$", "qqx.special:1"),  # backreference
    (r"^(?P<l>[a-z])(?P=l)n\.special:1$", "zzn.special:1"),  # named backreference
    (r"(?i)^INLINE\.special:1$", "inline.special:1"),  # global inline flag
    (r"(?s)^dotall.\.special:1$", "dotallx.special:1"),
    (r"(?x) ^ verbose \. special : 1 $  # comment", "verbose.special:1"),
    (r"(?-i:^Scoped\.special:1$)", "Scoped.special:1"),  # scoped flag: case-sensitive
    (r"^(a)?(?(1)b|c)cond\.special:1$", "abcond.special:1"),  # conditional on group 1
    (r"^(?:x|y)(?=z)zlook\.special:1$", "yzlook.special:1"),
    (r"^(?<!q)lb\.special:1$", "lb.special:1"),
    (r"^alt1\.special:1$|^alt2\.special:1$", "alt2.special:1"),
    (r"^\d{3}-digits\.special:1$", "123-digits.special:1"),
    (r"^\[brk\]\.special:1$", "[brk].special:1"),
]


def big_list(n_plain: int = 3 * CHUNK + 17) -> list[Pattern]:
    """Plain patterns with the specials spread through (chunk starts, middles, ends)."""
    pats = [compile_pattern(rf"^h{i}\.plain\.test:443$", f"big.txt:{i + 1}")
            for i in range(n_plain)]
    positions = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 2, 2 * CHUNK + 5,
                 2 * CHUNK + 6, 2 * CHUNK + 7, 3 * CHUNK - 1, 3 * CHUNK, 3 * CHUNK + 3,
                 3 * CHUNK + 9, len(pats)]
    assert len(positions) == len(SPECIALS)
    for k, ((text, _), pos) in reversed(list(enumerate(zip(SPECIALS, positions, strict=True)))):
        pats.insert(pos, compile_pattern(text, f"special:{k}"))
    return pats


def test_big_list_is_bigger_than_a_chunk():
    assert len(big_list()) > 3 * CHUNK


@pytest.mark.parametrize("k", range(len(SPECIALS)))
def test_big_list_special_patterns_work_and_report_themselves(k):
    pats = big_list()
    pl = PatternList(pats)
    text, cand = SPECIALS[k]
    p = pl.first_match(cand)
    assert p is not None, f"{text!r} did not match {cand!r} inside a list of {len(pats)}"
    assert (p.text, p.source) == (text, f"special:{k}")
    # and the same pattern alone agrees
    assert re.search(text, cand, re.IGNORECASE)


# The same kinds of pattern without any literal of three characters: these are not in the
# trigram index and go through the combined regexes (groups must not clash or shift there).
UNINDEXED_SPECIALS = [
    (r"^(g|a)\.s\d:1$", "a.s5:1"),
    (r"^(?P<nm>n\w)\.s\d:2$", "nm.s5:2"),
    (r"^(?P<nm>m\w)\.s\d:2$", "mx.s5:2"),  # the same group name again
    (r"^(\w)\1\.s\d:3$", "qq.s5:3"),
    (r"^(?P<l>[a-z])(?P=l)\.s\d:4$", "zz.s5:4"),
    (r"(?i)^I\w\.s\d:5$", "in.s5:5"),
    (r"(?s)^d.\.s\d:6$", "dx.s5:6"),
    (r"(?x) ^ v \w \. s \d : 7 $  # comment", "vb.s5:7"),
    (r"(?-i:^S\w\.s\d:8$)", "Sc.s5:8"),
    (r"^(a)?(?(1)b|c)\.s\d:9$", "ab.s5:9"),
    (r"^(a)?(?(1)b|c)\.s\d:9$", "c.s5:9"),
    (r"^(x)(y)?(?(2)z|w)\.t\d:1$", "xyz.t5:1"),
    (r"", "anything"),
]


def unindexed_list() -> list[Pattern]:
    """Plain patterns with no 3-character literal (x1.2.3:), specials spread through."""
    pats = [compile_pattern(rf"^x{i // 100}.{i // 10 % 10}.{i % 10}:$", f"u.txt:{i + 1}")
            for i in range(3 * CHUNK)]
    texts = list(dict.fromkeys(t for t, _ in UNINDEXED_SPECIALS))
    for k, text in reversed(list(enumerate(texts))):
        at = 1 + k * (len(pats) // len(texts))
        pats.insert(at, compile_pattern(text, f"special:{text}"))
        # a combinable pattern with groups just before: group numbers shift after it
        pats.insert(at, compile_pattern(r"^(q)(q)?\.z$", f"groups:{k}"))
    return pats


@pytest.mark.parametrize("text, cand", UNINDEXED_SPECIALS)
def test_unindexed_special_patterns_work_and_report_themselves(text, cand):
    pats = unindexed_list()
    pl = PatternList(pats)
    expected = naive_first(pats, cand)
    assert expected is not None and (text == "" or expected.text == text)
    assert pl.first_match(cand) is expected


def test_unindexed_plain_patterns_report_their_own_line():
    pats = [p for p in unindexed_list() if p.source.startswith("u.txt")]
    pl = PatternList(pats)
    for i in (0, 5, CHUNK - 1, CHUNK, 2 * CHUNK + 1, 3 * CHUNK - 1):
        cand = f"X{i // 100}-{i // 10 % 10}-{i % 10}:"
        assert pl.first_match(cand).source == f"u.txt:{i + 1}", cand


def test_group_number_conditional_after_other_groups():
    # (?(1)...) refers to group 1 of its own pattern, not to a group of an earlier one
    pats = [compile_pattern(r"^(x)(y)?:\d$", "groups"),
            compile_pattern(r"^(a)?(?(1)b|c)\.\d$", "cond")]
    pats += [compile_pattern(rf"^p{i}:1$", f"p:{i}") for i in range(CHUNK)]
    pl = PatternList(pats)
    for cand in ("ab.1", "c.1"):
        assert pl.first_match(cand) is pats[1], cand
    assert pl.first_match("a.1") is None
    assert pl.first_match("b.1") is None


def test_big_list_scoped_case_sensitivity_is_kept():
    pl = PatternList(big_list())
    assert pl.first_match("scoped.special:1") is None  # (?-i:...) stays case-sensitive


def test_big_list_plain_patterns_report_their_own_line():
    pats = big_list()
    pl = PatternList(pats)
    for i in (0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 3, 3 * CHUNK + 16):
        p = pl.first_match(f"H{i}.PLAIN.test:443")
        assert p is not None and p.source == f"big.txt:{i + 1}"
    assert pl.first_match("h99999.plain.test:443") is None


def test_big_list_first_of_several_matching_patterns_wins():
    pats = [compile_pattern(rf"^n{i}\.test:1$", f"f:{i}") for i in range(5 * CHUNK)]
    pats[3 * CHUNK + 7] = compile_pattern(r"dup\.test", "first")
    pats[3 * CHUNK + 8] = compile_pattern(r"^dup\.test:1$", "second")
    pats[4 * CHUNK + 1] = compile_pattern(r"dup", "third")
    pats[4 * CHUNK + 2] = compile_pattern("", "empty")  # matches everything after it
    pl = PatternList(pats)
    assert pl.first_match("dup.test:1").source == "first"
    assert pl.first_match("xdup:1").source == "third"
    assert pl.first_match("nothing.else:1").source == "empty"
    assert pl.first_match("n5.test:1").source == "f:5"  # before the empty pattern


def test_big_list_agrees_with_naive_first_match():
    rng = random.Random(1234)
    pats = big_list()
    extra = [r"\.example\.(com|org):\d+$", r"^10\.\d+\.\d+\.\d+:", r"^\[?fd00:", r"z+:9$",
             r"(?P<w>ww)w\.", r"^([a-c])\1"]
    for t in extra:
        pats.insert(rng.randrange(len(pats)), compile_pattern(t, f"extra:{t}"))
    pl = PatternList(pats)
    pool = [c for _, c in SPECIALS] + [f"h{i}.plain.test:443" for i in range(0, 500, 7)] + [
        "www.example.org:8443", "10.1.2.3:80", "[fd00::1]:443", "fd00::1:443", "zz:9",
        "aa.test:1", "cc:1", "ab:1", "nothing:1", "", "www.w.test:1"]
    for c in pool + [rng.choice(pool).upper() for _ in range(50)]:
        assert pl.first_match(c) is naive_first(pats, c), c


def test_repeated_lookups_give_the_same_answer_and_memory_stays_bounded():
    """Answers are cached per candidate; many distinct candidates must not grow memory
    without bound (a long run sees endless host names)."""
    import tracemalloc

    from dumpproxy import hostfilter

    pl = plist(r"^a\d+:1$", r"b")
    for _ in range(2):
        assert pl.first_match("a1:1").text == r"^a\d+:1$"
        assert pl.first_match("c:1") is None
    n = hostfilter.CACHE_MAX
    tracemalloc.start()
    try:
        for i in range(2 * n):
            pl.first_match(f"a{i}.example.test:1")
        after_few = tracemalloc.get_traced_memory()[0]
        for i in range(2 * n, 12 * n):
            pl.first_match(f"a{i}.example.test:1")
        after_many = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # five times more distinct candidates: at most one cache's worth (~200 B an entry) more
    assert after_many - after_few < n * 200, (after_few, after_many)
    assert pl.first_match("a5:1").text == r"^a\d+:1$"


# --------------------------------------------------------------------------- pattern files


def test_pattern_file_syntax(tmp_path: Path):
    f = tmp_path / "ignore.txt"
    f.write_text(
        "# a comment\n"  # 1
        "\n"  # 2
        "   \t \n"  # 3
        r"^(.+\.)?apple\.com:443$" "\n"  # 4
        "  ^example\\.com:443$  \t\n"  # 5
        "   # an indented comment\n"  # 6
        "\\#not-a-comment\n"  # 7
        "a # b\n"  # 8: '#' elsewhere is part of the pattern
        "last-no-newline"  # 9
    )
    pats = read_pattern_file(str(f))
    assert [(p.text, p.source) for p in pats] == [
        (r"^(.+\.)?apple\.com:443$", f"{f}:4"),
        (r"^example\.com:443$", f"{f}:5"),
        (r"\#not-a-comment", f"{f}:7"),
        ("a # b", f"{f}:8"),
        ("last-no-newline", f"{f}:9"),
    ]
    pl = PatternList(pats)
    assert pl.first_match("#not-a-comment:1").source == f"{f}:7"
    assert pl.first_match("a # b:1").source == f"{f}:8"
    assert pl.first_match("www.apple.com:443").source == f"{f}:4"


def test_pattern_file_source_is_the_path_as_given(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("rel.txt").write_text("\n\nx\n")
    assert [p.source for p in read_pattern_file("rel.txt")] == ["rel.txt:3"]
    assert [p.source for p in read_pattern_file("./rel.txt")] == ["./rel.txt:3"]


def test_pattern_file_crlf_line_endings(tmp_path: Path):
    f = tmp_path / "dos.txt"
    f.write_bytes(b"# comment\r\n\r\n^example\\.com:443$\r\nfoo\r\n")
    pats = read_pattern_file(str(f))
    assert [(p.text, p.source) for p in pats] == [
        (r"^example\.com:443$", f"{f}:3"), ("foo", f"{f}:4")]
    assert PatternList(pats).first_match("example.com:443") is not None


def test_pattern_file_line_numbers_are_physical_lines(tmp_path: Path):
    # A form feed or U+2028 inside a line does not start a new line (str.splitlines would).
    f = tmp_path / "ff.txt"
    f.write_text("# section one\x0c\n# caf\u00e9 \u2028 note\nfoo(\n", encoding="utf-8")
    with pytest.raises(PatternError) as e:
        read_pattern_file(str(f))
    assert str(e.value).startswith(f"{f}:3: invalid pattern 'foo('")


def test_pattern_file_utf8_bom_is_ignored(tmp_path: Path):
    # files saved by some Windows editors start with a BOM; it is not part of line 1
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbf# comment\n^example\\.com:443$\n")
    pats = read_pattern_file(str(f))
    assert [(p.text, p.source) for p in pats] == [(r"^example\.com:443$", f"{f}:2")]


def test_pattern_file_from_stdin_text():
    pats = read_pattern_file("-", stdin_text="# c\n\nexample\\.com\n")
    assert [(p.text, p.source) for p in pats] == [(r"example\.com", "-:3")]


def test_parse_pattern_lines_numbers_from_one():
    pats = parse_pattern_lines(["", "a", "#b", "c"], "p")
    assert [p.source for p in pats] == ["p:2", "p:4"]


def test_bad_pattern_in_file_names_file_and_line(tmp_path: Path):
    f = tmp_path / "ignore.txt"
    f.write_text("# one\nok\nfoo(\n")
    with pytest.raises(PatternError) as e:
        read_pattern_file(str(f))
    assert str(e.value) == (
        f"{f}:3: invalid pattern 'foo(': missing ), unterminated subpattern at position 3")


def test_bad_pattern_flag_names_the_flag():
    with pytest.raises(PatternError) as e:
        FilterSources(ignore_flags=("ok", "[z-a]")).load()
    assert str(e.value).startswith("--ignore-hosts: invalid pattern '[z-a]': bad character range")
    with pytest.raises(PatternError) as e:
        FilterSources(allow_flags=("*x",)).load()
    assert str(e.value).startswith("--allow-hosts: invalid pattern '*x': nothing to repeat")


def test_unreadable_files_name_the_file(tmp_path: Path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(PatternError) as e:
        read_pattern_file(str(missing))
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(PatternError) as e:
        read_pattern_file(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: cannot read: Is a directory"
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(PatternError) as e:
        read_pattern_file(str(binary))
    assert str(e.value) == f"{binary}: not valid UTF-8 (byte 6)"


def test_filter_sources_order_flags_then_files(tmp_path: Path):
    a = tmp_path / "a.txt"
    a.write_text("x\n\ny\n")
    b = tmp_path / "b.txt"
    b.write_text("z\n")
    f = FilterSources(ignore_flags=("f1", "f2"), ignore_files=(str(a), str(b)),
                      allow_flags=("g",), allow_files=(str(b),)).load()
    assert [(p.text, p.source) for p in f.ignore.patterns] == [
        ("f1", "--ignore-hosts"), ("f2", "--ignore-hosts"),
        ("x", f"{a}:1"), ("y", f"{a}:3"), ("z", f"{b}:1")]
    assert [(p.text, p.source) for p in f.allow.patterns] == [
        ("g", "--allow-hosts"), ("z", f"{b}:1")]


def test_filter_sources_stdin_is_read_once_and_reused():
    s = FilterSources(ignore_files=("-",), stdin_text="a\n#\nb\n")
    for _ in range(2):
        assert [(p.text, p.source) for p in s.load().ignore.patterns] == [
            ("a", "-:1"), ("b", "-:3")]


def test_filter_sources_reload_sees_new_file(tmp_path: Path):
    f = tmp_path / "i.txt"
    f.write_text("one\n")
    s = FilterSources(ignore_files=(str(f),))
    assert [p.text for p in s.load().ignore.patterns] == ["one"]
    f.write_text("# now\ntwo\n")
    assert [(p.text, p.source) for p in s.load().ignore.patterns] == [("two", f"{f}:2")]


# --------------------------------------------------------------------------- the rule


def test_rule_no_patterns_intercepts_by_default():
    f = hf()
    assert f.empty
    d = f.decide(["example.com:443"])
    assert d.fields() == {"action": "intercept", "reason": "default", "pattern": None,
                          "source": None, "matched": None, "candidates": ["example.com:443"]}
    assert not d.passthrough


def test_rule_ignore():
    f = hf(ignore=(r"example\.com",))
    assert not f.empty
    d = f.decide(["127.0.0.1:443", "example.com:443"])
    assert d.fields() == {"action": "passthrough", "reason": "ignore_hosts",
                          "pattern": r"example\.com", "source": "--ignore-hosts",
                          "matched": "example.com:443",
                          "candidates": ["127.0.0.1:443", "example.com:443"]}
    assert d.passthrough
    d = f.decide(["example.org:443"])
    assert (d.action, d.reason, d.pattern, d.matched) == ("intercept", "default", None, None)


def test_rule_allow():
    f = hf(allow=(r"example\.com",))
    d = f.decide(["127.0.0.1:443", "example.com:443"])
    assert d.fields() == {"action": "intercept", "reason": "allow_hosts",
                          "pattern": r"example\.com", "source": "--allow-hosts",
                          "matched": "example.com:443",
                          "candidates": ["127.0.0.1:443", "example.com:443"]}
    d = f.decide(["127.0.0.1:443", "example.org:443"])
    assert d.fields() == {"action": "passthrough", "reason": "allow_hosts", "pattern": None,
                          "source": None, "matched": None,
                          "candidates": ["127.0.0.1:443", "example.org:443"]}


def test_rule_allow_with_ignore_exceptions():
    f = hf(allow=(r"example\.com",), ignore=(r"^binary\.example\.com:",))
    d = f.decide(["example.com:443"])
    assert (d.action, d.reason, d.pattern) == ("intercept", "allow_hosts", r"example\.com")
    d = f.decide(["binary.example.com:443"])
    assert (d.action, d.reason, d.pattern, d.source, d.matched) == (
        "passthrough", "ignore_hosts", r"^binary\.example\.com:", "--ignore-hosts",
        "binary.example.com:443")
    d = f.decide(["example.org:443"])  # not allowed: passthrough, even if ignore would not
    assert (d.action, d.reason, d.pattern, d.matched) == ("passthrough", "allow_hosts", None,
                                                          None)


def test_rule_allow_miss_wins_over_ignore_hit():
    f = hf(allow=(r"^a\.test:",), ignore=(r"b\.test",))
    d = f.decide(["b.test:1"])
    assert (d.action, d.reason, d.pattern) == ("passthrough", "allow_hosts", None)


def test_rule_reports_first_matching_candidate():
    f = hf(ignore=(r"^www\.", r"^127\."))
    d = f.decide(["127.0.0.1:443", "www.example.com:443"])
    assert (d.pattern, d.matched) == (r"^127\.", "127.0.0.1:443")


def test_rule_empty_ignore_pattern_passes_everything():
    f = hf(ignore=("",))
    d = f.decide(["anything.test:1"])
    assert (d.action, d.reason, d.pattern, d.matched) == (
        "passthrough", "ignore_hosts", "", "anything.test:1")


def test_rule_empty_allow_pattern_intercepts_everything():
    d = hf(allow=("",)).decide(["anything.test:1"])
    assert (d.action, d.reason, d.pattern) == ("intercept", "allow_hosts", "")


# --------------------------------------------------------------------------- docs examples


@pytest.mark.parametrize("pattern, candidate, expected", [
    ("apple.com:443", "www.apple.com:443", True),
    ("apple.com:443", "apple.com:80", False),
    ("apple.com:443", "evilapple.com:443", True),  # unanchored: lax
    ("apple.com:443", "appleXcom:443", True),  # '.' is any character: lax
    ("apple.com", "apple.com.evil:443", True),  # no port in the pattern: laxer still
    (r"^(.+\.)?apple\.com:443$", "apple.com:443", True),
    (r"^(.+\.)?apple\.com:443$", "www.apple.com:443", True),
    (r"^(.+\.)?apple\.com:443$", "a.b.apple.com:443", True),
    (r"^(.+\.)?apple\.com:443$", "apple.com.evil:443", False),
    (r"^(.+\.)?apple\.com:443$", "evilapple.com:443", False),
    (r"^(.+\.)?apple\.com:443$", "apple.com:4430", False),
    ("^example.com:", "example.com:8443", True),
    ("^example.com:", "example.com:443", True),
    ("^example.com:", "www.example.com:443", False),
    (r"^example\.com:443$", "example.com:443", True),
    (r"^example\.com:443$", "www.example.com:443", False),
    (r"example\.com:443", "notexample.com:443", True),  # unanchored
    (r"17\.178\.\d+\.\d+:443", "17.178.96.59:443", True),
    (r"17\.178\.\d+\.\d+:443", "17.179.1.1:443", False),
    (r"17\.178\.\d+\.\d+:443", "117.178.0.1:4430", True),  # why the docs say to anchor
    (r"^17\.178\.\d+\.\d+:443$", "117.178.0.1:4430", False),
    (r"^17\.178\.96\.59:443$", "17.178.96.59:443", True),
    (r"example\.com", "EXAMPLE.COM:443", True),
    (r"EXAMPLE\.COM", "example.com:443", True),
])
def test_docs_examples(pattern, candidate, expected):
    assert matches(pattern, candidate) is expected


def test_docs_apple_com_443_does_not_match_apple_com_evil_443():
    # README's table says `apple.com:443` (laxly) matches `apple.com.evil:443`: it cannot,
    # "apple.com.evil:443" has no substring "apple?com:443". What it laxly matches is
    # evilapple.com:443 / appleXcom:443 (above); `apple.com` (no port) matches the evil one.
    assert re.search("apple.com:443", "apple.com.evil:443", re.IGNORECASE) is None
    assert not matches("apple.com:443", "apple.com.evil:443")


@pytest.mark.parametrize("candidate", [
    "example.com:443", "example.com:1", "[::1]:443", "::1:443", "example.com"])
def test_docs_anchored_without_port_never_matches(candidate):
    pl = plist(r"^example\.com$")
    if candidate == "example.com":  # not a candidate shape (always ends with :port)
        assert pl.first_match(candidate) is not None
        return
    assert pl.first_match(candidate) is None


def test_docs_anchored_without_port_never_matches_real_candidates():
    f = hf(ignore=(r"^example\.com$",))
    cands = candidates("example.com", 443, ip="93.184.216.34", sni="example.com",
                       host_header="example.com")
    assert f.decide(cands).action == "intercept"


@pytest.mark.parametrize("pattern, matched", [
    (r"^2001:db8::1:443$", "2001:db8::1:443"),
    (r"^\[2001:db8::1\]:443$", "[2001:db8::1]:443"),
    (r"2001:db8::1", "[2001:db8::1]:443"),
])
def test_docs_ipv6_both_forms(pattern, matched):
    for host, ip in (("2001:db8::1", None), ("[2001:db8::1]", None),
                     ("v6.example.com", "2001:db8::1")):
        d = hf(ignore=(pattern,)).decide(candidates(host, 443, ip=ip))
        assert (d.action, d.pattern, d.matched) == ("passthrough", pattern, matched)
        d = hf(ignore=(pattern,)).decide(candidates(host, 8443, ip=ip))
        assert d.action == ("passthrough" if pattern == "2001:db8::1" else "intercept")


# --------------------------------------------------------------------------- the index


TOKENS = ["abk", "ka1", "ss:", "Bab", "kk", "a1"]


def random_regex(rng: random.Random, depth: int = 0) -> str:
    atoms = ["a", "b", "c", "A", "k", "s", "1", ":", "-", r"\.", r"\-", ".", r"\d", r"\w",
             "[a-c]", "[^b]", "[.]", "^", "$", r"\b", "#", " ", "{", "}", "]",
             *TOKENS, *TOKENS, r"ab\.k", r"s\-a1"]
    quants = ["", "", "", "?", "*", "+", "{2}", "{0,2}", "{1,}", "??", "*?", "+?", "{,2}"]
    parts = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.15 and depth < 2:
            inner = random_regex(rng, depth + 1)
            atom = rng.choice(["({})", "(?:{})", "(?i:{})", "(?-i:{})", "(?={})", "(?!{})"]
                              ).format(inner)
        else:
            atom = rng.choice(atoms)
        parts.append(atom + rng.choice(quants))
    text = "".join(parts)
    if rng.random() < 0.1:
        text += "|" + random_regex(rng, depth + 1)
    return text


def random_patterns(rng: random.Random, n: int) -> list[Pattern]:
    out = []
    while len(out) < n:
        text = random_regex(rng)
        try:
            out.append(compile_pattern(text, f"r:{len(out)}"))
        except PatternError:
            continue
    return out


def random_strings(rng: random.Random, n: int) -> list[str]:
    # pieces of the patterns' literals and single characters, with KELVIN SIGN and LONG S
    # (which re.IGNORECASE matches to k and s)
    pieces = [*TOKENS, "ABK", "a.k", "s-a1", *"abcABks1:-._ #{}]\u212a\u017f"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) for _ in range(n)]


# Patterns whose literal text the index relies on, and strings around them.
LITERAL_EXAMPLES = [r"^example\.com:443$", r"^(.+\.)?Apple\.com:443$", r"abc?d", r"ab+cd",
                    r"x{2,3}yz", r"[)(]def", r"a|bcd", r"\x41bcd", r"(\w)\1abc"]
LITERAL_PROBES = ["example.com:443", "EXAMPLE.COM:443", "www.example.com:443", "examplexcom:443",
                  "apple.com:443", "www.apple.com:443", "xapple.com:443", "abd", "abcd", "abbbcd",
                  "acd", "xxyz", "xxxyz", "xyz", ")def", "(def", "def", "a", "bcd", "Abcd",
                  "aaabc", "xxabc", "abc", "ABCD", "abcdef"]


@pytest.mark.parametrize("text", LITERAL_EXAMPLES)
def test_literal_text_in_a_pattern_never_hides_a_match(text):
    """In a list large enough to be indexed, each pattern still matches exactly what
    re.search matches, and the first matching pattern wins."""
    filler = [compile_pattern(rf"^n{i}\.test:1$", f"f:{i}") for i in range(2 * CHUNK)]
    pats = [*filler[:CHUNK], compile_pattern(text, "example"), *filler[CHUNK:],
            compile_pattern(r"d", "late")]
    pl = PatternList(pats)
    for probe in LITERAL_PROBES:
        assert pl.first_match(probe) is naive_first(pats, probe), (text, probe)


def test_index_agrees_with_naive_first_match_on_random_patterns():
    rng = random.Random(99)
    sample = random_strings(rng, 60)
    matched = 0
    for _ in range(3):
        # selective patterns only (so that first matches spread over the whole list)
        pats = [p for p in random_patterns(rng, 1500)
                if sum(1 for s in sample if p.regex.search(s)) < 3][: 2 * CHUNK + 40]
        assert len(pats) > CHUNK
        pl = PatternList(pats)
        for s in random_strings(rng, 400):
            first = naive_first(pats, s)
            assert pl.first_match(s) is first, (s, pl.first_match(s), first)
            matched += first is not None
    assert matched > 100, matched  # the strings do hit patterns all over the list


def test_index_non_ascii_candidates_follow_ignorecase():
    # 'k' matches KELVIN SIGN and 's' LONG S under re.IGNORECASE: the index must not hide it
    pats = [compile_pattern(rf"^n{i}\.test:1$", f"f:{i}") for i in range(3 * CHUNK)]
    pats.append(compile_pattern(r"kiosk\.test", "last"))
    pl = PatternList(pats)
    for cand in ("\u212aiosk.test:1", "kio\u017fk.test:1", "KIOSK.TEST:1"):
        assert pl.first_match(cand) is pats[-1], cand


def test_patterns_sharing_a_common_trigram_still_match_in_order():
    # all share only ":443" (too common to index): they go through the combined regexes
    pats = [compile_pattern(rf"^[a-z]{{{i % 7 + 1}}}\d{{{i // 7 + 1}}}:443$", f"f:{i}")
            for i in range(3 * CHUNK)]
    pats.insert(2 * CHUNK, compile_pattern(r"^host\d+\.only\.test:443$", "indexed"))
    pl = PatternList(pats)
    for cand in ("ab12:443", "abcdefg" + "1" * 40 + ":443", "host7.only.test:443",
                 "abc1:443", "x:443", "ab1234:4430"):
        assert pl.first_match(cand) is naive_first(pats, cand), cand
    assert pl.first_match("host7.only.test:443").source == "indexed"
