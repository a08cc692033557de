"""The host filter: pattern lists, the egress verdict and the intercept-or-passthrough rule
(pure).

Two rules, in this order (SPEC §9.4, then §3): the egress lists say whether a destination
may be reached at all (`block`); what may be reached is then intercepted or passed
through by the allow/ignore lists.

Candidates are `host:port` strings (SPEC §3). Patterns have Python `re` syntax and
semantics (re.search, IGNORECASE); `re` compiles them at load (its error messages name
the mistake). A pattern whose shape can make a backtracking matcher take exponential or
high-polynomial time (a repeat inside a repeat, alternation under a repeat, a
backreference, several unbounded repeats) is matched instead by the `regex` module,
re-compatible (VERSION0) but interruptible: a decision may spend at most DECISION_BUDGET
in such patterns, so `(a|aa)+$` cannot stall every other client (the event loop is
single-threaded). Past the budget the decision is a passthrough with reason "timeout".

Large lists are matched through a trigram index: a pattern whose every match must contain
some literal text is tried only on candidates containing a trigram of that text; the other
patterns go through combined regexes over chunks of patterns (one C-level search per chunk
instead of one per pattern). Results are cached per candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import regex

from dumpproxy.addresses import join_host_port, split_host_port, strip_brackets

CHUNK = 128  # patterns per combined regex: few searches, cheap to find the winner inside
CACHE_MAX = 8192
DECISION_BUDGET = 0.1  # seconds of matching per decision, at most
_FLAGS = regex.IGNORECASE | regex.VERSION0


class PatternError(Exception):
    """A user mistake in a pattern or pattern file; the message names the culprit."""


@dataclass(frozen=True, slots=True)
class Pattern:
    text: str
    source: str  # "ignore.txt:3" or "--ignore-hosts"
    regex: re.Pattern
    slow: regex.Pattern | None  # for a pattern that can backtrack badly: matched with a limit


class MatchTimeout(Exception):
    """A pattern took longer than the decision budget on a candidate."""

    def __init__(self, pattern: Pattern | None):
        super().__init__(pattern.text if pattern else "patterns")
        self.pattern = pattern


@dataclass(frozen=True, slots=True)
class Egress:
    """The egress verdict on a destination: may it be reached at all (SPEC §9.4)?"""

    blocked: bool
    reason: str  # "egress_allow" / "egress_deny" / "default" (no allow list, no deny hit)
    # / "timeout" (a pattern took too long: blocked, when unsure keep the job in)
    pattern: str | None  # the pattern that decided it
    source: str | None  # its FILE:LINE (or flag); a block by no allow pattern: the list's
    matched: str | None
    audit: bool = False  # --egress-audit: a block is only reported (`would_block`)

    @property
    def enforced(self) -> bool:
        """The destination must not be reached."""
        return self.blocked and not self.audit

    def why(self, address: str) -> str:
        """For a person (403 body, wrap mode's summary): what blocked it, and where."""
        if self.reason == "egress_deny":
            return (f"{address} matches egress deny pattern {self.pattern!r} "
                    f"({self.source})")
        if self.reason == "timeout":
            return (f"{address}: egress pattern {self.pattern!r} ({self.source}) took "
                    "too long to match")
        return f"{address} matches no egress allow pattern ({self.source})"

    def refusal(self, address: str) -> str:
        """The body of the 403 a blocked CONNECT or plain-HTTP request gets."""
        return f"blocked by dumpproxy's egress policy: {self.why(address)}"

    def fields(self) -> dict:
        """The `decision` fields of a destination that was not blocked."""
        out: dict = {"egress_reason": self.reason, "egress_pattern": self.pattern,
                     "egress_source": self.source}
        if self.blocked:  # audit mode
            out["would_block"] = True
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "intercept" / "passthrough" / "block"
    reason: str  # "allow_hosts" / "ignore_hosts" / "default" / "timeout" / "egress_*"
    pattern: str | None
    source: str | None
    matched: str | None
    candidates: tuple[str, ...]
    egress: Egress | None = None  # the egress verdict, when egress lists are set

    @property
    def passthrough(self) -> bool:
        return self.action == "passthrough"

    def fields(self) -> dict:
        return {
            "action": self.action,
            "reason": self.reason,
            "pattern": self.pattern,
            "source": self.source,
            "matched": self.matched,
            "candidates": list(self.candidates),
        }

    def extra_fields(self) -> dict:
        """The optional fields after `sni`: the egress verdict of what was not blocked."""
        e = self.egress
        return e.fields() if e is not None and self.action != "block" else {}


def blocked_decision(verdict: Egress, cands: Sequence[str]) -> Decision:
    """The `block` decision of an enforced egress verdict."""
    return Decision("block", verdict.reason, verdict.pattern, verdict.source,
                    verdict.matched, tuple(cands), verdict)


@functools.lru_cache(maxsize=65536)
def _compile(text: str) -> re.Pattern:
    # re's own cache holds 512: without this a SIGHUP reload of a large file would
    # recompile every unchanged pattern while the event loop waits.
    return re.compile(text, re.IGNORECASE)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


@functools.lru_cache(maxsize=65536)
def _compile_matcher(text: str) -> regex.Pattern:
    return regex.compile(text, _FLAGS)


def compile_pattern(text: str, source: str) -> Pattern:
    try:
        checked = _compile(text)
    except re.error as e:
        raise PatternError(f"{source}: invalid pattern {text!r}: {e}") from None
    except (OverflowError, RecursionError) as e:  # beyond what re can compile
        raise PatternError(f"{source}: invalid pattern {_shown(text)}: too large or too "
                           f"deeply nested ({type(e).__name__}: {e})") from None
    slow = None
    if _may_backtrack(text):
        try:
            slow = _compile_matcher(text)
        except (regex.error, OverflowError, RecursionError) as e:  # valid for re, not regex
            raise PatternError(f"{source}: pattern {_shown(text)} is not supported: {e}") \
                from None
    return Pattern(text, source, checked, slow)


try:  # the parser behind re (public-ish: both names are what re itself imports)
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


@functools.lru_cache(maxsize=65536)
def _may_backtrack(text: str) -> bool:
    """True when a backtracking matcher may take far more than linear time on this
    pattern: a repeat (or alternation) inside a repeat, a backreference, or more than one
    unbounded repeat. Conservative: a safe pattern flagged here only costs some speed."""
    try:
        tree = _sre_parse.parse(text, re.IGNORECASE)
    except Exception:
        return True
    unbounded = 0

    def walk(items, in_repeat: bool) -> bool:
        nonlocal unbounded
        for op, av in items:
            name = str(op)
            if name in _REPEATS:
                low, high, sub = av
                if high == _sre_parse.MAXREPEAT:
                    unbounded += 1
                repeats = high > 1
                if (repeats and in_repeat) or walk(sub, in_repeat or repeats):
                    return True
            elif name == "BRANCH":
                if in_repeat or any(walk(b, in_repeat) for b in av[1]):
                    return True
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return True
            elif name == "SUBPATTERN":
                if walk(av[-1], in_repeat):
                    return True
            elif name in ("ASSERT", "ASSERT_NOT"):
                if walk(av[1], in_repeat):
                    return True
            elif name == "ATOMIC_GROUP":
                if walk(av, in_repeat):
                    return True
        return False

    return walk(tree, False) or unbounded > 1


def parse_pattern_lines(lines: Iterable[str], path: str) -> list[Pattern]:
    """Pattern-file syntax: stripped lines; blank lines and `#` comments skipped."""
    out = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append(compile_pattern(text, f"{path}:{number}"))
    return out


def read_pattern_file(path: str, stdin_text: str | None = None) -> list[Pattern]:
    if path == "-":
        if stdin_text is None:
            stdin_text = sys.stdin.read()
        return parse_pattern_lines(stdin_text.split("\n"), "-")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a leading BOM is not part of line 1
            text = f.read()
    except UnicodeDecodeError as e:
        raise PatternError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise PatternError(f"{path}: cannot read: {e.strerror or e}") from None
    # Physical lines: open() already made \r\n and \r into \n; splitlines() would also
    # split at form feeds, U+2028 and the like, and shift every later line number.
    return parse_pattern_lines(text.split("\n"), path)


def _combinable(p: Pattern) -> bool:
    # Named groups would clash and backreferences / group-number conditionals `(?(1)..)`
    # would shift once patterns are joined; global flags are only legal at the very start
    # (Python 3.10 still accepts them anywhere, with a warning, applying them to the whole
    # combined regex). Such patterns stand alone.
    return not p.regex.groupindex and not re.search(
        r"\\[1-9]|\(\?P=|\(\?\(|\(\?[aiLmsux]+\)", p.text
    )


_PUNCT = frozenset(string.punctuation + " ")  # escaped, these stand for themselves
_QUANTIFIER = re.compile(r"\{\d*(?:,\d*)?\}")


def _skip_class(text: str, i: int) -> int | None:
    """Index just after the character class starting at text[i] == '['."""
    j = i + 1
    if text.startswith("^", j):
        j += 1
    if text.startswith("]", j):
        j += 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == "]":
            return j + 1
        else:
            j += 1
    return None


def _skip_group(text: str, i: int) -> int | None:
    """Index just after the group starting at text[i] == '('."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            k = _skip_class(text, j)
            if k is None:
                return None
            j = k
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _required_runs(text: str) -> list[str] | None:
    """Lower-cased ASCII literal runs that every match of `text` contains (None: unknown).

    Conservative: groups, classes, anchors, wildcards and anything not understood end a
    run; a quantified character leaves it (or ends it, for `+`); a top-level `|` or an
    escape with a numeric payload (\\x41, \\1, ...) gives up.
    """
    runs: list[str] = []
    run: list[str] = []
    literal = False  # was the last item a character appended to `run`?
    i, n = 0, len(text)

    def end() -> None:
        if run:
            runs.append("".join(run))
            run.clear()

    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt in _PUNCT:
                run.append(nxt)
                literal = True
                i += 2
                continue
            if not nxt or nxt in "xuUN" or nxt.isdigit():
                return None
            end()  # \\d \\w \\b \\n ...: not a literal character
            literal = False
            i += 2
        elif c == "|":
            return None
        elif c in "[(":
            end()
            literal = False
            j = (_skip_class if c == "[" else _skip_group)(text, i)
            if j is None:
                return None
            i = j
        elif c in "?*{":
            if c == "{" and not _QUANTIFIER.match(text, i):
                end()  # a literal '{' to re; not worth the trouble
                literal = False
                i += 1
                continue
            if literal:
                run.pop()  # the character may be absent
            end()
            literal = False
            i = _QUANTIFIER.match(text, i).end() if c == "{" else i + 1
        elif c == "+" or c in ".^$)]}" or not c.isascii():
            end()  # after `x+` the next character need not follow x directly
            literal = False
            i += 1
        else:
            run.append(c.lower())
            literal = True
            i += 1
    end()
    return runs


def _choose_trigrams(patterns: Sequence[Pattern]) -> list[str | None]:
    """For each pattern, its rarest required trigram (None: the pattern has none)."""
    grams_of: list[list[str]] = []
    freq: dict[str, int] = {}
    for p in patterns:
        runs = None if p.regex.flags & re.VERBOSE else _required_runs(p.text)
        grams = sorted({r[k : k + 3] for r in runs or () for k in range(len(r) - 2)})
        grams_of.append(grams)
        for g in grams:
            freq[g] = freq.get(g, 0) + 1
    return [min(gs, key=freq.__getitem__) if gs else None for gs in grams_of]


class PatternList:
    """An ordered pattern list; `first_match` gives the first pattern matching a string."""

    def __init__(self, patterns: Sequence[Pattern]):
        self.patterns = tuple(patterns)
        self._index: dict[str, list[int]] = {}  # trigram -> indices of patterns needing it
        rest: list[int] = []  # patterns without a required trigram
        grams = _choose_trigrams(self.patterns)
        counts: dict[str | None, int] = {}
        for gram in grams:
            counts[gram] = counts.get(gram, 0) + 1
        for i, gram in enumerate(grams):
            if gram is None or counts[gram] > CHUNK:  # too common: combined regexes are faster
                rest.append(i)
            else:
                self._index.setdefault(gram, []).append(i)
        self._groups: list[tuple[re.Pattern | regex.Pattern, tuple[int, ...]]] = []
        run: list[int] = []
        for i in rest:
            if _combinable(self.patterns[i]) and self.patterns[i].slow is None:
                run.append(i)
                if len(run) == CHUNK:
                    self._add_group(run)
                    run = []
            else:
                if run:
                    self._add_group(run)
                    run = []
                p = self.patterns[i]
                self._groups.append((p.slow or p.regex, (i,)))
        if run:
            self._add_group(run)
        self._cache: dict[str, Pattern | None] = {}

    def _add_group(self, run: list[int]) -> None:
        if len(run) == 1:
            self._groups.append((self.patterns[run[0]].regex, (run[0],)))
            return
        combined = re.compile("|".join(f"(?:{self.patterns[i].text})" for i in run),
                              re.IGNORECASE)
        self._groups.append((combined, tuple(run)))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)

    def first_match(self, candidate: str, deadline: float | None = None) -> Pattern | None:
        """The first pattern (in list order) that matches; MatchTimeout past the deadline
        (time.monotonic(); default: DECISION_BUDGET from now)."""
        try:
            hit = self._cache[candidate]
        except KeyError:
            pass
        else:
            if type(hit) is MatchTimeout:
                raise MatchTimeout(hit.pattern)  # a fresh one: no traceback piling up
            return hit  # type: ignore[return-value]
        if deadline is None:
            deadline = time.monotonic() + DECISION_BUDGET
        try:
            result = self._first_match(candidate, deadline)
        except MatchTimeout as e:  # remembered too: the next try would take as long
            self._remember(candidate, e)
            raise
        self._remember(candidate, result)
        return result

    def _remember(self, candidate: str, result: Pattern | MatchTimeout | None) -> None:
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[candidate] = result

    def _first_match(self, candidate: str, deadline: float) -> Pattern | None:
        pats = self.patterns
        found: int | None = None  # index of the first match so far
        for combined, members in self._groups:
            if type(combined) is re.Pattern:
                if combined.search(candidate):
                    found = next(i for i in members if pats[i].regex.search(candidate))
                    break
            elif _timed_search(pats[members[0]], candidate, deadline):
                found = members[0]
                break
        if candidate.isascii():
            low = candidate.lower()
            index = self._index
            hits: Iterable[int] = sorted({
                i for g in {low[k : k + 3] for k in range(len(low) - 2)}
                for i in index.get(g, ())
            })
        else:  # IGNORECASE pairs such as K/\u212a and s/\u017f defeat the ASCII index
            hits = range(len(pats))
        for i in hits:
            if found is not None and i >= found:
                break
            p = pats[i]
            if (p.regex.search(candidate) if p.slow is None
                    else _timed_search(p, candidate, deadline)):
                found = i
                break
        return None if found is None else pats[found]

    def search(self, candidates: Iterable[str],
               deadline: float | None = None) -> tuple[Pattern, str] | None:
        """The first candidate (in order) that any pattern matches, with that pattern."""
        if deadline is None:
            deadline = time.monotonic() + DECISION_BUDGET
        for c in candidates:
            p = self.first_match(c, deadline)
            if p is not None:
                return p, c
        return None


def _timed_search(p: Pattern, candidate: str, deadline: float) -> bool:
    """A pattern that may backtrack badly, searched within what is left of the budget."""
    try:
        return p.slow.search(  # type: ignore[union-attr]
            candidate, timeout=max(deadline - time.monotonic(), 0.0)) is not None
    except TimeoutError:
        raise MatchTimeout(p) from None


def _no_patterns() -> PatternList:
    return PatternList(())


@dataclass(frozen=True)
class HostFilter:
    allow: PatternList
    ignore: PatternList
    egress_allow: PatternList = field(default_factory=_no_patterns)
    egress_deny: PatternList = field(default_factory=_no_patterns)
    audit: bool = False  # --egress-audit
    # the allow list's files and flags, for "matches none"; given (even an empty file, which
    # then blocks everything) when not empty
    egress_allow_source: str = ""
    egress_deny_given: bool = False
    #: egress lists are set: destinations are judged before they are connected
    egress_on: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.egress_allow and not self.egress_allow_source:
            object.__setattr__(self, "egress_allow_source", "--egress-allow")
        object.__setattr__(self, "egress_on", bool(
            self.egress_allow_source or self.egress_deny or self.egress_deny_given))

    @property
    def empty(self) -> bool:
        return not self.allow and not self.ignore

    def egress(self, candidates: Sequence[str]) -> Egress:
        """SPEC §9.4's rule: a destination matching a deny pattern is blocked; else, when
        there is an allow list, one matching none of it. A pattern that takes too long
        blocks (reason "timeout"): when unsure, the job stays in."""
        audit = self.audit
        deadline = time.monotonic() + DECISION_BUDGET
        try:
            hit = self.egress_deny.search(candidates, deadline) if self.egress_deny else None
            if hit is not None:
                p, c = hit
                return Egress(True, "egress_deny", p.text, p.source, c, audit)
            if not self.egress_allow_source:  # no allow list
                return Egress(False, "default", None, None, None, audit)
            hit = self.egress_allow.search(candidates, deadline)
        except MatchTimeout as e:
            p = e.pattern
            return Egress(True, "timeout", p and p.text, p and p.source, None, audit)
        if hit is None:
            return Egress(True, "egress_allow", None, self.egress_allow_source, None, audit)
        p, c = hit
        return Egress(False, "egress_allow", p.text, p.source, c, audit)

    def decide(self, candidates: Sequence[str], egress: Egress | None = None) -> Decision:
        """SPEC §3's rule, after the egress verdict (given, or judged here on these
        candidates when egress lists are set): an enforced block decides `block`. A
        pattern that takes too long decides passthrough (reason "timeout", that pattern
        named): when unsure, leave traffic untouched."""
        cands = tuple(candidates)
        if egress is None and self.egress_on:
            egress = self.egress(cands)
        if egress is not None and egress.enforced:
            return blocked_decision(egress, cands)
        deadline = time.monotonic() + DECISION_BUDGET
        try:
            d = self._decide(cands, deadline)
        except MatchTimeout as e:
            p = e.pattern
            d = Decision("passthrough", "timeout", p and p.text, p and p.source, None, cands)
        return d if egress is None else dataclasses.replace(d, egress=egress)

    def _decide(self, cands: tuple[str, ...], deadline: float) -> Decision:
        allowed = None
        if self.allow:
            allowed = self.allow.search(cands, deadline)
            if allowed is None:
                return Decision("passthrough", "allow_hosts", None, None, None, cands)
        if self.ignore:
            hit = self.ignore.search(cands, deadline)
            if hit is not None:
                p, c = hit
                return Decision("passthrough", "ignore_hosts", p.text, p.source, c, cands)
        if allowed is not None:
            p, c = allowed
            return Decision("intercept", "allow_hosts", p.text, p.source, c, cands)
        return Decision("intercept", "default", None, None, None, cands)


@dataclass(frozen=True)
class FilterSources:
    """Where the patterns come from, kept so that SIGHUP can re-read the files."""

    ignore_flags: tuple[str, ...] = ()
    allow_flags: tuple[str, ...] = ()
    ignore_files: tuple[str, ...] = ()
    allow_files: tuple[str, ...] = ()
    stdin_text: str | None = None  # `-` is read once; a reload reuses it
    egress_allow_flags: tuple[str, ...] = ()
    egress_deny_flags: tuple[str, ...] = ()
    egress_allow_files: tuple[str, ...] = ()
    egress_deny_files: tuple[str, ...] = ()
    egress_audit: bool = False

    def with_stdin(self) -> FilterSources:
        files = (self.ignore_files + self.allow_files + self.egress_allow_files
                 + self.egress_deny_files)
        if "-" not in files or self.stdin_text is not None:
            return self
        return dataclasses.replace(self, stdin_text=sys.stdin.read())

    def load(self) -> HostFilter:
        """Compile every pattern; raises PatternError naming the first bad one."""

        def gather(flags: tuple[str, ...], flag: str, files: tuple[str, ...]) -> PatternList:
            pats = [compile_pattern(t, flag) for t in flags]
            for path in files:
                pats.extend(read_pattern_file(path, self.stdin_text))
            return PatternList(pats)

        return HostFilter(
            allow=gather(self.allow_flags, "--allow-hosts", self.allow_files),
            ignore=gather(self.ignore_flags, "--ignore-hosts", self.ignore_files),
            egress_allow=gather(self.egress_allow_flags, "--egress-allow",
                                self.egress_allow_files),
            egress_deny=gather(self.egress_deny_flags, "--egress-deny",
                               self.egress_deny_files),
            audit=self.egress_audit,
            egress_allow_source=", ".join(
                (["--egress-allow"] if self.egress_allow_flags else [])
                + list(self.egress_allow_files)),
            egress_deny_given=bool(self.egress_deny_flags or self.egress_deny_files),
        )


# --- candidate strings ---------------------------------------------


def _forms(host: str, port: int) -> list[str]:
    host = strip_brackets(host)
    if ":" in host:  # IPv6: bracketed and bare, so patterns written either way work
        return [f"[{host}]:{port}", f"{host}:{port}"]
    return [f"{host}:{port}"]


def candidates(
    host: str,
    port: int,
    ip: str | None = None,
    sni: str | None = None,
    host_header: str | None = None,
) -> list[str]:
    """Candidate strings in SPEC §3 order: resolved ip, logical host, SNI, Host header."""
    out: list[str] = []
    if ip is not None:
        out += _forms(ip, port)
    out += _forms(host, port)
    if sni:
        out += _forms(sni, port)
    if host_header:
        try:
            h, p = split_host_port(host_header, default_port=port)
        except ValueError:
            h, p = host_header, port
        out += _forms(h, p)
    return list(dict.fromkeys(out))  # unique, order kept


def exact_pattern(target: str) -> str:
    """`--pattern-for`: a pattern matching exactly this host:port (every metachar escaped)."""
    host, port = split_host_port(target)
    return "^" + re.escape(join_host_port(host, port)) + "$"
