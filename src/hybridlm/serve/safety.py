"""The safety filter: a chain of filters applied to prompts and to model output, streamed output too.

Why a chain of small filters: deployments differ in what they must stop, so rules are data (TOML)
and a classifier can be plugged in without touching the server. Every hit names its rule and an
action: `block` refuses the prompt (HTTP 400) or ends the reply (finish_reason "content_filter"),
`redact` replaces the matched text, `flag` lets the text through and sends it to human review.

Why it is fast: each rule is one regex compiled at start-up (a blocklist becomes one alternation),
scanned with `finditer` from the first character not yet released, and streamed output is scanned
once per RELEASE_STEP new characters rather than once per token, so a request costs a few regex
passes over its own text (about 1 µs per rule per 50 characters scanned).

Streamed output is checked before it is sent: the guard holds back the last `hold_chars`
characters (at least the longest blocklist phrase, and any match in progress) so a pattern split
across two tokens is still caught. A regex match longer than `hold_chars` can start in text already
sent and so cannot be recalled: keep `hold_chars` at least as long as the longest match an output
pattern should catch (the default, 48, covers the built-in rules). Filters that need the whole text (a classifier) run
once the reply is complete; by then a streamed reply has been sent, so their `block` only changes
the final finish_reason to "content_filter" and their hits go to review.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hybridlm.errors import UserError
from hybridlm.settings import import_callable

ACTIONS = ("block", "redact", "flag")
RELEASE_STEP = 16
"""Streamed output is scanned and released in steps of this many characters (about 4 tokens):
the regexes then pass over each character a few times instead of once per token."""
DIRECTIONS = ("prompt", "output")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One named rule: regex `patterns` and/or a blocklist of `words` (whole words or phrases)."""

    name: str
    action: str
    patterns: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    applies_to: tuple[str, ...] = DIRECTIONS
    ignore_case: bool = True
    replacement: str = "[redacted]"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise UserError(f"safety rule {self.name!r}: action must be one of {', '.join(ACTIONS)} (got {self.action!r})")
        if not self.patterns and not self.words:
            raise UserError(f"safety rule {self.name!r} needs `patterns` (regexes) or `words` (a blocklist)")
        if not self.applies_to or set(self.applies_to) - set(DIRECTIONS):
            raise UserError(f"safety rule {self.name!r}: applies_to takes prompt and/or output (got {self.applies_to!r})")

    def source(self) -> str:
        """The rule as one regex source (patterns and the blocklist as alternatives)."""
        parts = [f"(?:{p})" for p in self.patterns]
        if self.words:
            words = sorted({w.strip() for w in self.words if w.strip()}, key=len, reverse=True)
            parts.append(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)")
        return "|".join(parts)

    def compile(self) -> re.Pattern[str]:
        try:
            return re.compile(self.source(), re.IGNORECASE if self.ignore_case else 0)
        except re.error as exc:
            raise UserError(f"safety rule {self.name!r}: bad regex ({exc})") from None


DEFAULT_RULES = (
    Rule(name="private-key", action="block", patterns=(r"-----BEGIN [A-Z ]*PRIVATE KEY-----",)),
    Rule(name="payment-card", action="redact", patterns=(r"\b(?:\d{4}[ -]){3}\d{4}\b", r"\b\d{16}\b")),
    Rule(name="us-ssn", action="redact", patterns=(r"\b\d{3}-\d{2}-\d{4}\b",)),
    Rule(name="email-address", action="redact", applies_to=("output",),
         patterns=(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",)),
    Rule(name="weapons", action="flag", words=(
        "build a bomb", "make a bomb", "pipe bomb", "nerve agent", "bioweapon", "make explosives",
        "untraceable gun", "ghost gun")),
    Rule(name="self-harm", action="flag", words=(
        "kill myself", "end my life", "suicide", "self-harm", "hurt myself")),
)
"""The built-in rules: secrets are blocked, identifiers redacted, dangerous topics flagged for review."""


@dataclass(frozen=True)
class Hit:
    filter: str
    rule: str
    action: str
    start: int
    end: int


class Filter(Protocol):
    """What a filter provides. `streaming` filters judge any prefix of a text (regex rules);
    the others need the whole text and run once it is complete."""

    name: str
    streaming: bool

    def scan(self, text: str, direction: str, pos: int = 0) -> list[Hit]: ...


class RuleFilter:
    """The built-in filter: named rules, each one precompiled regex."""

    streaming = True

    def __init__(self, rules: list[Rule] | tuple[Rule, ...], name: str = "rules") -> None:
        self.name = name
        self.rules = tuple(rules)
        compiled = [(rule, rule.compile()) for rule in self.rules]
        self._by_direction = {d: [(r, c) for r, c in compiled if d in r.applies_to] for d in DIRECTIONS}

    def scan(self, text: str, direction: str, pos: int = 0) -> list[Hit]:
        return [Hit(self.name, rule.name, rule.action, m.start(), m.end())
                for rule, regex in self._by_direction[direction] for m in regex.finditer(text, pos) if m.end() > m.start()]

    def applies_to(self, direction: str) -> bool:
        return bool(self._by_direction[direction])

    def longest_word(self, direction: str) -> int:
        """The longest blocklist phrase for `direction` (+1 for the boundary check after it)."""
        return max((len(w) + 1 for r, _ in self._by_direction[direction] for w in r.words), default=0)

    def replacement(self, rule_name: str) -> str:
        return next((r.replacement for r in self.rules if r.name == rule_name), "[redacted]")


class ClassifierFilter:
    """The hook for a model-based check: `score(text, direction) -> float` in [0, 1]; a score at or
    above `threshold` is one hit over the whole text with this filter's action."""

    streaming = False

    def __init__(self, score: Callable[[str, str], float], *, threshold: float = 0.5, action: str = "flag",
                 name: str = "classifier", applies_to: tuple[str, ...] = DIRECTIONS) -> None:
        if action not in ACTIONS or action == "redact":
            raise UserError(f"classifier action must be block or flag (got {action!r})")
        self.score, self.threshold, self.action, self.name, self.directions = score, threshold, action, name, applies_to

    def scan(self, text: str, direction: str, pos: int = 0) -> list[Hit]:
        if direction not in self.directions or not text[pos:]:
            return []
        return [Hit(self.name, self.name, self.action, pos, len(text))] if self.score(text[pos:], direction) >= self.threshold else []


def load_classifier(spec: str) -> Callable[[str, str], float]:
    """`package.module:function` -> the function (called as function(text, direction) -> score)."""
    return import_callable(spec, "safety.classifier")


@dataclass
class Verdict:
    text: str
    """The text after redactions."""
    hits: list[Hit]

    @property
    def blocked(self) -> bool:
        return any(h.action == "block" for h in self.hits)


def redact(text: str, hits: list[Hit], replacement: Callable[[str], str], offset: int = 0) -> str:
    """`text` (which starts at `offset` of the scanned string) with redact hits replaced."""
    out, cursor = [], 0
    for hit in sorted((h for h in hits if h.action == "redact"), key=lambda h: h.start):
        start, end = hit.start - offset, hit.end - offset
        if start < cursor or start < 0 or end > len(text):
            continue  # overlaps a span already replaced
        out += [text[cursor:start], replacement(hit.rule)]
        cursor = end
    return "".join(out) + text[cursor:]


class SafetyChain:
    """The filters in order, plus how much streamed output must wait for them."""

    def __init__(self, filters: list[Filter], hold_chars: int = 48) -> None:
        self.filters = list(filters)
        rules = [f for f in self.filters if isinstance(f, RuleFilter) and f.applies_to("output")]
        self.hold_chars = max(hold_chars, *(f.longest_word("output") for f in rules)) if rules else 0

    @property
    def fast(self) -> bool:
        """True when every filter is a regex rule filter (cheap enough to run on the event loop)."""
        return all(isinstance(f, RuleFilter) for f in self.filters)

    def scan(self, text: str, direction: str, pos: int = 0, streaming_only: bool = False) -> list[Hit]:
        return [h for f in self.filters if f.streaming or not streaming_only for h in f.scan(text, direction, pos)]

    def replacement(self, rule: str) -> str:
        return next((f.replacement(rule) for f in self.filters if isinstance(f, RuleFilter)
                     and any(r.name == rule for r in f.rules)), "[redacted]")

    def check(self, text: str, direction: str) -> Verdict:
        """Every filter over a whole text (a prompt, or a complete reply)."""
        hits = self.scan(text, direction)
        return Verdict(redact(text, hits, self.replacement), hits)

    def guard(self) -> OutputGuard:
        return OutputGuard(self)


@dataclass
class OutputGuard:
    """Filters one streamed reply: `feed` each new piece and send what it returns; `finish` at the end.
    `new_hits` holds the hits found since it was last emptied (for metrics and review)."""

    chain: SafetyChain
    raw: str = ""
    released: int = 0
    blocked: bool = False
    new_hits: list[Hit] = field(default_factory=list)

    def feed(self, piece: str) -> str:
        if self.blocked:
            return ""
        self.raw += piece
        hold = self.chain.hold_chars
        if hold and len(self.raw) - self.released < hold + RELEASE_STEP:
            return ""  # scan once per RELEASE_STEP new characters, not once per token
        return self._release(len(self.raw) - hold)

    def finish(self) -> str:
        """The rest of the reply, and the whole-text filters' verdict on all of it."""
        if self.blocked:
            return ""
        tail = self._release(len(self.raw))
        late = [h for f in self.chain.filters if not f.streaming for h in f.scan(self.raw, "output")]
        self.new_hits += late
        self.blocked = self.blocked or any(h.action == "block" for h in late)
        return tail

    def _release(self, end: int) -> str:
        hits = self.chain.scan(self.raw, "output", self.released, streaming_only=True)
        block = min((h for h in hits if h.action == "block"), key=lambda h: h.start, default=None)
        if block is not None:
            end, self.blocked = block.start, True  # the reply ends here: all before the match may go
            self.new_hits.append(block)
        end = _not_inside_a_match(max(end, self.released), hits)
        if end <= self.released:
            return ""
        released = [h for h in hits if h.end <= end and h.action != "block"]
        self.new_hits += released
        text = redact(self.raw[self.released:end], released, self.chain.replacement, self.released)
        self.released = end
        return text


def _not_inside_a_match(end: int, hits: list[Hit]) -> int:
    """Move `end` back until it cuts through no match (a match must be released whole)."""
    moved = True
    while moved:
        moved = False
        for hit in hits:
            if hit.start < end < hit.end:
                end, moved = hit.start, True
    return end


def build_chain(rules: list[Rule], *, builtin: bool = True, classifier: str = "", threshold: float = 0.5,
                classifier_action: str = "flag", hold_chars: int = 48) -> SafetyChain:
    """The chain a server runs: built-in rules, then configured rules, then an optional classifier."""
    filters: list[Filter] = []
    all_rules = [*(DEFAULT_RULES if builtin else ()), *rules]
    names = [r.name for r in all_rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"safety rule names must be unique (repeated: {', '.join(duplicates)})")
    if all_rules:
        filters.append(RuleFilter(all_rules))
    if classifier:
        filters.append(ClassifierFilter(load_classifier(classifier), threshold=threshold, action=classifier_action))
    return SafetyChain(filters, hold_chars=hold_chars)
