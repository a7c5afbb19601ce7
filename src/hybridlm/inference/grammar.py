"""Grammar-constrained decoding: a reply that must match a JSON schema (or a Lark grammar) is
sampled only from the tokens that keep it matching, one mask per step.

Why llguidance (measured on the quickstart's tokenizer; docs/architecture.md has the comparison):
it has no dependencies (one abi3 wheel), builds a grammar in well under a millisecond and computes
each step's mask lazily in microseconds, reads our `tokenizers` JSON as it is, and takes Lark
grammars that mix free text with JSON, which "auto" tool choice needs. xgrammar's masks were
faster still but it pulls transformers, triton and tvm-ffi; outlines-core builds a whole index
over the vocabulary up front (seconds for any-JSON-object).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from hybridlm.errors import UserError
from hybridlm.tokenizer import TextTokenizer


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is laid out: `json.dumps`'s separators and no other whitespace between
tokens (flexible whitespace lets a model pad a reply with newlines until max_tokens)."""


class GrammarError(UserError):
    """A schema or grammar the engine cannot compile; `path` is the JSON pointer of the part at fault."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} (at {path or '/'})")
        self.reason, self.path = message, path


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance: pip install 'hybridlm[serve]'") from None
    return llguidance


class GrammarCompiler:
    """Compiles grammars for one tokenizer; its llguidance tokenizer is built once (about 15 ms for
    4,096 tokens). `stop_ids` are the tokens that may end a reply once the grammar is satisfied."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self._llg = _llguidance()
        self._tokenizer = self._llg.LLTokenizer(tokenizer.to_json(), eos_token=sorted(stop_ids))
        self.vocab_size = vocab_size

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        """Replies that are JSON documents valid under `schema` (always enforced, strict or not)."""
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        grammar = self._llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        error = self._error(grammar)
        if error:
            raise GrammarError(*self._locate(schema, error))
        return Grammar(self, grammar)

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's `json_object` response format)."""
        return self.json_schema({"type": "object"})

    def lark(self, text: str) -> Grammar:
        """Replies in the language of a Lark grammar (llguidance's dialect: `%json {...}` embeds a schema)."""
        grammar = self._llg.LLMatcher.grammar_from_lark(text)
        error = self._error(grammar)
        if error:
            raise GrammarError(error)
        return Grammar(self, grammar)

    def _error(self, grammar: str) -> str:
        failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        return messages[0] if failed else ""

    def _locate(self, schema: dict, error: str) -> tuple[str, str]:
        """(error, JSON pointer) of the deepest part of `schema` that fails alone: where to look. A
        `$ref` that cannot resolve out of its context is no finding; with no finding, the whole."""
        found = (error, "")
        for path, part in _subschemas(schema, ""):
            part_error = self._error(self._llg.LLMatcher.grammar_from_json_schema(part))
            if part_error and "Pointer" not in part_error and path.count("/") > found[1].count("/"):
                found = (part_error, path)
        return found


def _subschemas(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    """Every object below `node` (not `node` itself), with its JSON pointer."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        child_path = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
        if isinstance(child, dict):
            yield child_path, child
        yield from _subschemas(child, child_path)


class Grammar:
    """A compiled grammar: immutable, shared by the choices of a request; each gets a matcher."""

    def __init__(self, compiler: GrammarCompiler, grammar: str) -> None:
        self._compiler = compiler
        self._prototype = compiler._llg.LLMatcher(compiler._tokenizer, grammar, log_level=0)

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._prototype.deep_copy(), self._compiler.vocab_size)


class GrammarMatcher:
    """The state of one reply in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher, self._vocab_size = matcher, vocab_size

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the reply in the grammar (stop tokens once it is
        complete); ids the tokenizer lacks (a padded model vocabulary) are never allowed."""
        bias = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed_V = torch.zeros(self._vocab_size, dtype=torch.bool)
        allowed_V[: bias.numel()] = bias[: self._vocab_size] != 0
        return allowed_V

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error().splitlines()[0]}")

    @property
    def complete(self) -> bool:
        """Whether the reply so far is a whole sentence of the grammar."""
        return self._matcher.is_accepting()


def tool_call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON a tool call is written as, for a choice among `tools` (OpenAI function specs:
    name, parameters): {"name": <one of them>, "arguments": <its parameters>}. Each tool's `$defs`
    move to the root, where its "#/$defs/..." references point once the parameters are nested."""
    calls, defs = [], {}
    for tool in tools:
        parameters = dict(tool.get("parameters") or {"type": "object"})
        for name, definition in parameters.pop("$defs", {}).items():
            if name in defs and defs[name] != definition:
                raise GrammarError(f"two tools define $defs/{name} differently; give them distinct names",
                                   "/$defs/" + name)
            defs[name] = definition
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": tool["name"]}, "arguments": parameters}})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return schema | ({"$defs": defs} if defs else {})


def text_or_tool_call(tools: list[dict[str, Any]]) -> str:
    """A Lark grammar for "auto" tool choice: free text that does not start with "{", or one tool
    call (the model chooses with its first token)."""
    schema = tool_call_schema(tools) | {"x-guidance": JSON_LAYOUT}
    return f"start: TEXT | call\nTEXT: /(?s:[^{{].*)?/\ncall: %json {json.dumps(schema)}\n"
