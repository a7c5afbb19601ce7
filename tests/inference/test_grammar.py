"""Grammar-constrained sampling with llguidance on a real trained tokenizer: replies sampled under
a JSON schema's mask (random logits, hypothesis-generated schemas) always parse and validate with
`jsonschema`, an independent validator; tool-call grammars produce calls of the given tools; the
"auto" grammar allows both text and a call; a schema the engine cannot compile is refused with
the JSON pointer of the part at fault."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridlm.inference.grammar import GrammarCompiler, GrammarError, text_or_tool_call, tool_call_schema
from hybridlm.inference.sampling import SamplingParams, choose_token
from hybridlm.run import load_run

MAX_TOKENS = 400


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return load_run(tiny_run).tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, tokenizer.vocab_size + 4, [tokenizer.eos_id])  # a padded model vocabulary


def sample_under(grammar, tokenizer, seed: int, favour: str = '"]},') -> tuple[str, bool]:
    """Random logits, masked by the grammar at every step (closing characters and eos favoured so
    strings and arrays end): the text and whether eos ended it within MAX_TOKENS."""
    generator = torch.Generator().manual_seed(seed)
    vocab = grammar._compiler.vocab_size
    boost_V = torch.zeros(vocab)
    boost_V[[tokenizer.encode(c)[0] for c in favour] + [tokenizer.eos_id]] = 3.0
    matcher, ids = grammar.matcher(), []
    params = SamplingParams(max_new_tokens=1, temperature=1.0)
    for _ in range(MAX_TOKENS):
        allowed_V = matcher.allowed()
        assert not allowed_V[tokenizer.vocab_size:].any()  # ids beyond the tokenizer are never allowed
        token = choose_token(torch.randn(vocab, generator=generator) + boost_V, params, torch.empty(0, dtype=torch.long),
                             generator, allowed_V=allowed_V)
        assert allowed_V[token]
        if token == tokenizer.eos_id:
            assert matcher.complete
            return tokenizer.decode(ids), True
        matcher.accept(token)
        ids.append(token)
    return tokenizer.decode(ids), False


leaf = st.one_of(
    st.just({"type": "string"}), st.just({"type": "integer"}), st.just({"type": "number"}), st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz ", min_size=1, max_size=5), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    st.integers(-50, 50).map(lambda n: {"const": n}),
    st.tuples(st.integers(-100, 0), st.integers(1, 100)).map(lambda r: {"type": "integer", "minimum": r[0], "maximum": r[1]}),
)


def _object(children):
    return st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children, min_size=1, max_size=4).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props))).map(lambda required: {
            "type": "object", "properties": props, "required": sorted(required), "additionalProperties": False}))


schemas = st.recursive(leaf, lambda children: st.one_of(
    _object(children), children.map(lambda item: {"type": "array", "items": item, "maxItems": 3}),
    st.lists(children, min_size=2, max_size=3).map(lambda options: {"anyOf": options})), max_leaves=8)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**31 - 1))
def test_replies_sampled_under_a_json_schema_parse_and_validate(compiler, tokenizer, schema, seed):
    text, ended = sample_under(compiler.json_schema(schema), tokenizer, seed)
    assert ended, f"no end within {MAX_TOKENS} tokens: {text[:200]!r}"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_replies_are_objects(compiler, tokenizer):
    for seed in range(5):
        text, ended = sample_under(compiler.json_object(), tokenizer, seed)
        if ended:
            assert isinstance(json.loads(text), dict)


TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
             "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
             "required": ["city", "days"], "additionalProperties": False}},
         {"name": "ping", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]


def test_tool_call_grammars_produce_calls_of_the_given_tools(compiler, tokenizer):
    names = set()
    for seed in range(12):
        text, ended = sample_under(compiler.json_schema(tool_call_schema(TOOLS)), tokenizer, seed)
        assert ended
        call = json.loads(text)
        tool = next(t for t in TOOLS if t["name"] == call["name"])
        jsonschema.validate(call["arguments"], tool["parameters"])
        names.add(call["name"])
    assert names == {"get_weather", "ping"}  # "required" lets the model pick any of them
    forced = compiler.json_schema(tool_call_schema(TOOLS[:1]))
    assert json.loads(sample_under(forced, tokenizer, 1)[0])["name"] == "get_weather"


def test_auto_grammar_allows_text_or_one_call(compiler, tokenizer):
    grammar = compiler.lark(text_or_tool_call(TOOLS))
    free = grammar.matcher()
    for token in tokenizer.encode("Hello {there}"):  # text may hold braces after its first character
        assert free.allowed()[token]
        free.accept(token)
    assert free.complete
    call = grammar.matcher()
    for token in tokenizer.encode('{"name": "ping"'):
        call.accept(token)
    assert not call.complete and not call.allowed()[tokenizer.eos_id]  # a started call must be finished
    with pytest.raises(RuntimeError, match="refused"):
        call.accept(tokenizer.encode("x")[0])


@pytest.mark.parametrize(("schema", "path", "reason"), [
    ({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "/properties/a", "nonsense"),
    ({"type": "object", "required": ["b"], "properties": {"b": {"type": "array", "minItems": 1, "items": {
        "type": "integer", "minimum": 5, "maximum": 2}}}}, "/properties/b/items", "minimum (5) is greater than maximum (2)"),
    ({"type": "string", "pattern": "(("}, "", "unclosed group"),
])
def test_uncompilable_schemas_are_refused_naming_the_part(compiler, schema, path, reason):
    with pytest.raises(GrammarError) as caught:
        compiler.json_schema(schema)
    assert caught.value.path == path and reason in caught.value.reason


def test_constrained_json_has_json_dumps_layout_and_no_free_whitespace(compiler, tokenizer):
    matcher = compiler.json_schema({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                    "required": ["a", "b"], "additionalProperties": False}).matcher()
    for token in tokenizer.encode('{"a": 1, "b"'):
        matcher.accept(token)
    allowed = [tokenizer.decode([t]) for t in matcher.allowed().nonzero().flatten().tolist()]
    assert allowed and all(text.startswith(":") for text in allowed)  # not "\n", not " :"
