"""The safety filter chain: rules (patterns, blocklists, actions), the streamed-output guard, the
classifier hook, and rules read from the server's TOML."""

from __future__ import annotations

import pytest

from hybridlm.errors import UserError
from hybridlm.serve.config import load_serve_config
from hybridlm.serve.safety import DEFAULT_RULES, Rule, SafetyChain, build_chain


def chain(*rules: Rule, hold: int = 16, builtin: bool = False, **kw) -> SafetyChain:
    return build_chain(list(rules), builtin=builtin, hold_chars=hold, **kw)


def test_actions_block_redact_flag():
    c = chain(Rule(name="secret", action="block", words=("open sesame",)),
              Rule(name="ssn", action="redact", patterns=(r"\b\d{3}-\d{2}-\d{4}\b",)),
              Rule(name="topic", action="flag", words=("dragon",)))
    verdict = c.check("My SSN is 123-45-6789 and I like Dragons and DRAGON eggs.", "prompt")
    assert verdict.text == "My SSN is [redacted] and I like Dragons and DRAGON eggs."
    assert [(h.rule, h.action) for h in verdict.hits] == [("ssn", "redact"), ("topic", "flag")]
    assert not verdict.blocked  # "Dragons" is not the whole word "dragon"; "DRAGON" is (case-insensitive)
    assert c.check("say OPEN  sesame", "prompt").hits == []  # phrases match as written
    assert c.check("then: open sesame!", "output").blocked


def test_rules_apply_to_their_directions_only():
    c = chain(Rule(name="mail", action="redact", applies_to=("output",), patterns=(r"\S+@\S+\.com",)))
    assert c.check("write to a@b.com", "prompt").text == "write to a@b.com"
    assert c.check("write to a@b.com", "output").text == "write to [redacted]"


def test_builtin_rules_block_secrets_redact_identifiers_and_flag_topics():
    c = build_chain([], builtin=True)
    assert c.check("-----BEGIN RSA PRIVATE KEY-----\nMIIE", "prompt").blocked
    assert c.check("card 4111 1111 1111 1111 ok", "output").text == "card [redacted] ok"
    assert c.check("mail me at jane.doe@example.org", "output").text == "mail me at [redacted]"
    assert [h.action for h in c.check("how do I build a bomb", "prompt").hits] == ["flag"]
    assert c.check("The value of x3 is 8.", "output").hits == []
    assert {r.name for r in DEFAULT_RULES} >= {"private-key", "payment-card", "us-ssn", "weapons", "self-harm"}


def feed_all(guard, pieces: list[str]) -> str:
    return "".join(guard.feed(p) for p in pieces) + guard.finish()


def test_streamed_output_is_redacted_even_when_the_match_is_split_across_pieces():
    c = chain(Rule(name="ssn", action="redact", patterns=(r"\b\d{3}-\d{2}-\d{4}\b",)), hold=16)
    text = "Her number is 123-45-6789, please keep it. " * 3
    for size in (1, 2, 3, 7):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        guard = c.guard()
        released = [guard.feed(p) for p in pieces]
        assert "".join(released) + guard.finish() == text.replace("123-45-6789", "[redacted]")
        assert sum(map(len, released)) > 0  # text flows before the end, not all at finish
        assert [h.rule for h in guard.new_hits] == ["ssn"] * 3  # each hit reported once


def test_a_block_rule_stops_the_stream_before_the_match():
    c = chain(Rule(name="secret", action="block", words=("open sesame",)), hold=16)
    guard = c.guard()
    out = feed_all(guard, list("Say the words: open sesame and the door opens."))
    assert guard.blocked and out == "Say the words: "
    assert [h.action for h in guard.new_hits] == ["block"]
    assert guard.feed("more") == ""


def test_hold_back_covers_the_longest_blocklist_phrase_and_too_short_a_hold_misses_patterns():
    c = chain(Rule(name="phrase", action="redact", words=("a rather long phrase indeed",)), hold=4)
    assert c.hold_chars == len("a rather long phrase indeed") + 1
    assert feed_all(c.guard(), list("say a rather long phrase indeed.")) == "say [redacted]."
    short = chain(Rule(name="ssn", action="redact", patterns=(r"\b\d{3}-\d{2}-\d{4}\b",)), hold=4)
    text = "x" * 30 + " 123-45-6789 ok"  # released in steps: "1" goes out before the match is complete
    assert "123-45-6789" in feed_all(short.guard(), list(text))  # the documented limit


def test_no_output_rules_means_no_hold_back():
    c = chain(Rule(name="p", action="flag", applies_to=("prompt",), words=("x",)), hold=16)
    guard = c.guard()
    assert guard.feed("hello") == "hello" and c.hold_chars == 0


def score_banana(text: str, direction: str) -> float:
    return 1.0 if "banana" in text else 0.0


def test_classifier_hook_runs_on_prompts_and_on_the_complete_reply():
    c = chain(classifier=f"{__name__}:score_banana", classifier_action="block")
    assert c.check("a banana split", "prompt").blocked
    assert not c.check("an apple", "prompt").blocked
    guard = c.guard()
    out = feed_all(guard, ["ban", "ana ", "bread"])
    assert out == "banana bread" and guard.blocked  # sent, then the finish becomes content_filter
    assert [(h.filter, h.action) for h in guard.new_hits] == [("classifier", "block")]


@pytest.mark.parametrize("rule, message", [
    ({"name": "r", "action": "delete", "words": ("x",)}, "action must be one of"),
    ({"name": "r", "action": "flag"}, "needs `patterns`"),
    ({"name": "r", "action": "flag", "patterns": ("(",)}, "bad regex"),
    ({"name": "r", "action": "flag", "words": ("x",), "applies_to": ("input",)}, "applies_to"),
])
def test_bad_rules_are_user_errors(rule, message):
    with pytest.raises(UserError, match=message):
        build_chain([Rule(**rule)], builtin=False)


def test_bad_classifier_spec_is_a_user_error():
    with pytest.raises(UserError, match="cannot be imported"):
        build_chain([], builtin=False, classifier="no_such_module_xyz:f")


def test_rules_come_from_the_server_toml(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text('[safety]\nbuiltin_rules = false\nhold_chars = 8\n'
                    '[[safety.rules]]\nname = "codename"\naction = "redact"\nwords = ["project falcon"]\n'
                    'applies_to = ["output"]\nreplacement = "[codename]"\n')
    cfg = load_serve_config(path)
    c = build_chain(cfg.safety.rules, builtin=cfg.safety.builtin_rules, hold_chars=cfg.safety.hold_chars)
    assert c.check("about Project Falcon today", "output").text == "about [codename] today"
    path.write_text('[[safety.rules]]\nname = "x"\naction = "flag"\nwords = "oops"\n')
    with pytest.raises(UserError, match="list of strings"):
        load_serve_config(path)
    with pytest.raises(UserError, match="unknown safety key"):
        load_serve_config(None, ["safety.colour=1"])
    with pytest.raises(UserError, match="unique"):
        build_chain([Rule(name="weapons", action="flag", words=("x",))], builtin=True)
