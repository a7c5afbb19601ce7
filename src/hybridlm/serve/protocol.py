"""The wire format: OpenAI-shaped request, response and error models (pydantic).

Why OpenAI's shapes: users already have clients, SDKs and tools that speak them, so the server is
useful the moment it starts. Requests are validated strictly (a string is not a number) and unknown
fields are ignored, as OpenAI's own server does, so newer clients keep working. Limits that depend
on the running server (the token cap, the context) are checked in the routes, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "content_filter", "tool_calls"]
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {})


NOT_IMPLEMENTED_COMPLETIONS: dict[str, Callable[[Any], bool]] = {
    "best_of": lambda v: v in (None, 1), "suffix": _off,
}
"""Fields of OpenAI's completion request this server does not implement, each with the test that
its value asks for nothing (then it is accepted); any other value is refused by name."""
NOT_IMPLEMENTED_CHAT: dict[str, Callable[[Any], bool]] = {
    "audio": _off, "function_call": lambda v: v in (None, "none"), "functions": _off, "metadata": _off, "modalities": lambda v: v in (None, ["text"]), "moderation": _off,
    "parallel_tool_calls": lambda v: v in (None, False), "prediction": _off, "prompt_cache_key": _off,
    "prompt_cache_options": _off, "prompt_cache_retention": _off, "reasoning_effort": _off,
    "service_tier": lambda v: v in (None, "auto", "default"), "store": _off,
    "verbosity": _off, "web_search_options": _off,
}
"""The same for chat completions (`parallel_tool_calls`: a reply holds at most one call, so only
false, or leaving it out, asks for what the server does)."""


def refuse_unimplemented(data: Any, table: dict[str, Callable[[Any], bool]]) -> Any:
    """A request that asks for something this server does not do gets a 400 naming the field,
    never a reply that silently lacks it (fields outside OpenAI's schema stay ignored)."""
    if isinstance(data, dict):
        for name, asks_nothing in table.items():
            if name in data and not asks_nothing(data[name]):
                raise ApiError(400, f"`{name}` is not supported by this server; leave it out", param=name,
                               code="unsupported_parameter")
    return data


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with the request's token counts."""


class SamplingFields(_Request):
    """Parameters both endpoints share."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding; tiny values are greedy in effect.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (at most the server's max_n).")
    stop: str | StopList | None = Field(None, description="Up to 4 strings; the reply ends before the first one.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from the logit of every "
                                    "token the reply already holds.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per "
                                     "time the reply already holds it.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=1024, description="Token id (as a string) -> value added to its logit before sampling.")
    top_k: int = Field(0, ge=-1, description="Extension (vLLM): keep the k most likely tokens; 0 or -1 keeps all.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Extension (vLLM): drop tokens less likely than min_p "
                         "times the most likely one.")
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="Extension (vLLM): > 1 discourages tokens "
                                      "of the prompt and the reply (positive logits divided, negative multiplied).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="An end-user id, written to the audit log.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        return refuse_unimplemented(data, NOT_IMPLEMENTED_COMPLETIONS)

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=1)] = Field(
        description="The text to continue, or its token ids as they are (no <|eos|> put in front); a list "
                    "holds exactly one prompt.")
    max_tokens: int | None = Field(None, ge=0, description="New tokens per choice (default 16; at most the server's "
                                   "cap; 0 only with echo).")
    echo: bool = Field(False, description="Put the prompt before the reply (and its tokens' log-probabilities "
                       "before the reply's); not with stream.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of each new token and of this "
                                 "many alternatives, under the model's distribution before temperature / top-p.")

    def requested_top_logprobs(self) -> int | None:
        """Alternatives per token to report (0: the chosen token alone), or None for no log-probabilities."""
        return self.logprobs

    def prompt_text(self) -> str | None:
        """The prompt as text, or None when it came as token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None

    def prompt_token_ids(self) -> list[int] | None:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], str):
            return None
        return list(self.prompt[0]) if isinstance(self.prompt[0], list) else list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class CalledFunction(_Request):
    name: Name
    arguments: str
    """The arguments as a JSON text (OpenAI's shape)."""


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Request):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(None, max_length=16, description="An assistant turn's calls (history).")
    tool_call_id: str | None = Field(None, max_length=128, description="The call a tool message answers.")

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JsonSchemaFormat(_Request):
    name: Name
    description: str | None = None
    schema_: dict[str, Any] = Field({"type": "object"}, alias="schema")
    strict: bool | None = Field(None, description="Accepted either way: the schema is always enforced.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type json_schema, and type json_schema needs it")
        return self


class FunctionSpec(_Request):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments; none: any object.")
    strict: bool | None = Field(None, description="Accepted either way: a forced call always follows parameters.")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Request):
    name: Name


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        return refuse_unimplemented(data, NOT_IMPLEMENTED_CHAT)

    safety_identifier: str | None = Field(None, max_length=256, description="An end-user id, written to the audit log.")
    logprobs: bool | None = Field(None, description="Log-probabilities of each new token, under the model's "
                                  "distribution before temperature / top-p.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: this many alternatives per token.")

    def requested_top_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    response_format: ResponseFormat | None = Field(None, description="json_object / json_schema: the reply is "
                                                   "decoded under the schema as a grammar constraint.")
    tools: list[Tool] | None = Field(None, max_length=64, description="Functions the model may call; they are "
                                     "described to it in the system message.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none: text; auto (default with tools): text or one call, the model's choice; required "
                          "or a named function: one call, decoded under its parameters' schema.")

    @model_validator(mode="after")
    def _tools_fit(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ApiError(400, "tools holds the same function name twice; names must be unique", param="tools")
        if self.tool_mode() not in ("none", None) and not names:
            raise ApiError(400, "tool_choice asks for a call but tools is empty; give the tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ApiError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        if self.tool_mode() not in ("none", None) and self.response_format and self.response_format.type != "text":
            raise ApiError(400, "response_format and tool calls cannot both constrain one reply; drop one",
                           param="response_format")
        return self

    def tool_mode(self) -> str | None:
        """"none", "auto", "required" or "function:NAME" (a forced call); None without tools."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return f"function:{self.tool_choice.function.name}"
        return self.tool_choice or ("auto" if self.tools else None)
    max_tokens: int | None = Field(None, ge=1, description="New tokens per choice; default: the cap, or what fits.")
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name for max_tokens.")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    """None for the prompt's first token when echoed: nothing predicts it."""
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]
    """Where each token starts in the reply text, in characters."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    """The token's UTF-8 bytes (a token may hold part of a character)."""


class TokenLogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobContent]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FeedbackMessage(_Request):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class FeedbackRequest(_Request):
    """A person's judgement of replies (the chat page's thumbs and comparisons): a rating of one
    reply, or the reply picked of two; stored with the key id for `hybridlm feedback export`."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    messages: list[FeedbackMessage] = Field(min_length=1, max_length=512, description="The conversation the "
                                            "reply answered, exactly as sent to /v1/chat/completions.")
    reply: str | None = Field(None, max_length=100_000, description="The rated reply (with rating).")
    rating: Literal["up", "down"] | None = None
    chosen: str | None = Field(None, max_length=100_000, description="The reply picked (with rejected).")
    rejected: str | None = Field(None, max_length=100_000, description="The reply not picked.")

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        rating = self.reply is not None and self.rating is not None
        comparison = self.chosen is not None and self.rejected is not None
        if rating == comparison or (rating and (self.chosen or self.rejected)) or (
                comparison and (self.reply or self.rating)):
            raise ValueError("give either reply and rating (up or down), or chosen and rejected")
        if comparison and self.chosen == self.rejected:
            raise ValueError("chosen and rejected are the same text; a comparison needs two different replies")
        return self


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybridlm"
    context_length: int
    max_tokens: int
    version: str
    """The version serving new requests (a registry version such as NAME/3, or the run directory's name)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """Any request the server refuses: becomes `{"error": {...}}` with `status`, never a traceback."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": what} for status, what in {
        400: "Invalid request (bad parameters, prompt too long, blocked by the safety filter)",
        401: "Missing or unknown API key",
        404: "Unknown model",
        413: "Request body too large",
        429: "Rate limit reached (see Retry-After)",
        503: "Queue full; retry later",
    }.items()
}
