"""Structured output and tool calls through the live server and the official `openai` client, on
chatty_run (conftest.py; a long context for the tool descriptions): json_object and json_schema replies parse and validate (jsonschema),
tool_choice "required" / a named function give valid calls of that tool as `tool_calls`, "auto"
gives text or a call, streaming sends a call whole, a tool conversation's history is accepted,
and schemas or tool choices the server cannot honour get a 400 that names them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from httpserver import KEY, NO_LIMITS, serving_run

CAP = 160
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                          "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def live(chatty_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    with serving_run(chatty_run, tmp, f"server.max_tokens_cap={CAP}", "server.max_n=4", *NO_LIMITS) as live:
        tokenizer = live.service.tokenizer
        closers = {str(tokenizer.encode(c)[0]): 4.0 for c in '"}'}  # so the random-weight model closes strings soon
        yield SimpleNamespace(model=live.model, closers=closers, url=live.url,
                              client=openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=120))


def chat(live, **kwargs):
    args = {"model": live.model, "messages": ASK, "max_tokens": CAP, "temperature": 1.0, "seed": 3, "n": 4,
            "logit_bias": live.closers} | kwargs
    return live.client.chat.completions.create(**args)


def test_json_object_and_json_schema_replies_parse_and_validate(live):
    free = chat(live, response_format={"type": "json_object"})
    done = [c for c in free.choices if c.finish_reason == "stop"]
    assert done and all(isinstance(json.loads(c.message.content), dict) for c in done)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "tags"],
              "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
    typed = chat(live, response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema,
                                                                               "strict": True}})
    done = [c for c in typed.choices if c.finish_reason == "stop"]
    assert done
    for choice in done:
        jsonschema.validate(json.loads(choice.message.content), schema)
    plain = chat(live, n=1)
    assert not plain.choices[0].message.content.startswith("{")  # unconstrained, the model writes no JSON


def test_required_and_named_tool_choice_reply_with_valid_calls(live):
    for choice_arg, names in (("required", {"get_weather", "ping"}), ({"type": "function", "function": {"name": "get_weather"}},
                                                                      {"get_weather"})):
        reply = chat(live, tools=[WEATHER, PING], tool_choice=choice_arg)
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
            spec = WEATHER if call.function.name == "get_weather" else PING
            jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_auto_tool_choice_replies_with_text_or_a_call_and_none_with_text(live):
    for choice in chat(live, tools=[WEATHER]).choices:
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
        else:
            assert not choice.message.content.startswith("{") and choice.finish_reason in ("stop", "length")
    for choice in chat(live, tools=[WEATHER], tool_choice="none").choices:
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


def test_a_streamed_call_arrives_whole_and_equals_the_unstreamed_one(live):
    args = {"tools": [WEATHER], "tool_choice": "required", "n": 1, "seed": 11}
    whole = chat(live, **args).choices[0].message.tool_calls[0]
    events = list(chat(live, stream=True, **args))
    calls = [d for e in events for c in e.choices for d in (c.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == whole.function.name
    assert calls[0].function.arguments == whole.function.arguments
    assert events[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_conversation_history_is_accepted(live):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 4 C"}]
    reply = chat(live, messages=messages, tools=[WEATHER], n=1, max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}}, "response_format", "at /properties/a"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 1}}}}}],
      "tool_choice": "required"}, "tools", "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "tools is empty"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot both"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "same function name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, None, "tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages", "not JSON"),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema"),
])
def test_requests_the_server_cannot_honour_get_a_400_naming_the_part(live, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(live, n=1, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and words in error["message"], error
    if param is not None:
        assert error["param"] == param


def test_refs_in_tool_parameters_and_tools_named_like_modes(live):
    booking = {"type": "function", "function": {"name": "auto", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["when"],
        "properties": {"when": {"$ref": "#/$defs/Day"}}, "$defs": {"Day": {"enum": ["mon", "tue"]}}}}}
    reply = chat(live, tools=[booking, PING], tool_choice={"type": "function", "function": {"name": "auto"}}, n=2)
    for choice in reply.choices:  # a forced call of the tool called "auto", not the "auto" mode
        (call,) = choice.message.tool_calls
        assert call.function.name == "auto" and json.loads(call.function.arguments)["when"] in ("mon", "tue")


def test_only_a_whole_call_of_a_given_tool_becomes_tool_calls():
    from hybridlm.serve.tools import as_tool_call

    names = frozenset({"ping"})
    assert as_tool_call(' {"name": "ping", "arguments": {}}', "stop", "auto", names)[1] is None  # text that starts with a space
    assert as_tool_call('{"name": "pong", "arguments": {}}', "stop", "auto", names)[1] is None  # not a given tool
    assert as_tool_call('{"name": "ping", "arguments": 3}', "stop", "auto", names)[1] is None
    content, calls, finish = as_tool_call('{"name": "ping", "arguments": {}}', "stop", "auto", names)
    assert content is None and calls[0].function.name == "ping" and finish == "tool_calls"
