"""Tool calls and structured replies for chat: how tools reach the model, which grammar constrains
the reply, and how a reply becomes OpenAI's `tool_calls`.

The chat template knows system, user and assistant turns only, so tools are described in the
system message, a call is written as one JSON object {"name": ..., "arguments": {...}} (the form
the grammar forces), an earlier assistant call is rendered in that same form, and a tool's result
comes back as a user turn that names the call.
"""

from __future__ import annotations

import json
import uuid

from hybridlm.inference.grammar import Grammar, GrammarCompiler, GrammarError, text_or_tool_call, tool_call_schema
from hybridlm.serve.protocol import ApiError, CalledFunction, ChatCompletionRequest, ChatMessage, Tool, ToolCall

_CALLING = ("You can call these functions. To call one, reply with only a JSON object "
            '{"name": <function name>, "arguments": <its arguments>}.')


def _spec(tool: Tool) -> dict:
    return tool.function.model_dump(exclude_none=True, exclude={"strict"})


def render_messages(body: ChatCompletionRequest, contents: list[str]) -> list[dict]:
    """The request's turns (with `contents`, the screened texts) as system/user/assistant messages
    for the chat template, the tools described in the system message."""
    messages = [_turn(i, message, text) for i, (message, text) in enumerate(zip(body.messages, contents))]
    if body.tools:
        described = "\n".join([_CALLING, *(json.dumps(_spec(tool)) for tool in body.tools)])
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{described}"}
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages


def _turn(index: int, message: ChatMessage, text: str) -> dict:
    if message.role == "tool":
        return {"role": "user", "content": f"Result of call {message.tool_call_id}: {text}"}
    if not message.tool_calls:
        return {"role": message.role, "content": text}
    calls = []
    for j, call in enumerate(message.tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            raise ApiError(400, f"messages[{index}].tool_calls[{j}].function.arguments is not JSON text",
                           param="messages") from None
        calls.append(json.dumps({"name": call.function.name, "arguments": arguments}))
    return {"role": "assistant", "content": "\n".join([text, *calls] if text else calls)}


def reply_grammar(body: ChatCompletionRequest, compiler: GrammarCompiler) -> Grammar | None:
    """The constraint the request asks for: its response format, or its tool choice; None for free text."""
    mode, tools = body.tool_mode(), body.tools or []
    if mode not in (None, "none"):
        specs = [_spec(tool) for tool in tools]
        for i, spec in enumerate(specs):  # name the tool whose parameters fail, before combining them
            _compiled(lambda s=spec: compiler.json_schema(s.get("parameters") or {"type": "object"}),
                      f"tools[{i}].function.parameters", "tools")
        if mode == "auto":
            return _compiled(lambda: compiler.lark(text_or_tool_call(specs)), "tools", "tools")
        chosen = specs if mode == "required" else [s for s in specs if f"function:{s['name']}" == mode]
        return _compiled(lambda: compiler.json_schema(tool_call_schema(chosen)), "tools", "tools")
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return compiler.json_object()
    return _compiled(lambda: compiler.json_schema(fmt.json_schema.schema_), "response_format.json_schema.schema",
                     "response_format")


def _compiled(compile_it, where: str, param: str) -> Grammar:
    try:
        return compile_it()
    except GrammarError as exc:
        raise ApiError(400, f"{where} cannot be used as a grammar: {exc.reason} (at {exc.path or '/'} of it); "
                       "simplify that part", param=param, code="invalid_schema") from None


def as_tool_call(text: str, finish: str | None, mode: str | None,
                 names: frozenset[str] = frozenset()) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """(content, tool_calls, finish_reason) of one finished choice: a complete call of one of the
    tools `names` (the grammar writes it from the reply's first character) becomes `tool_calls`
    with finish "tool_calls"; anything else, a call cut short by max_tokens included, stays content."""
    if mode in (None, "none") or finish != "stop" or not text.startswith("{"):
        return text, None, finish
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return text, None, finish
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return text, None, finish
    function = CalledFunction(name=call["name"], arguments=json.dumps(call["arguments"]))
    return None, [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", type="function", function=function)], "tool_calls"
