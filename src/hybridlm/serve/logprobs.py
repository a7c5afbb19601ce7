"""Log-probabilities in OpenAI's two shapes: chat's per-token objects (`token`, `logprob`, `bytes`,
`top_logprobs`) and completions' parallel lists (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`). The values are the model's own distribution at each step, before logit bias,
penalties, temperature and top-k / top-p / min-p (as vLLM reports them)."""

from __future__ import annotations

import codecs

from hybridlm.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobContent, TopLogprob
from hybridlm.serve.service import TokenLogprob
from hybridlm.tokenizer import TextTokenizer


def _named(tokenizer: TextTokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: TextTokenizer, entries: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for entry in entries:
        token, raw = _named(tokenizer, entry.token)
        top = [TopLogprob(token=name, logprob=lp, bytes=alt_raw)
               for name, alt_raw, lp in ((*_named(tokenizer, t), lp) for t, lp in entry.top)]
        content.append(TokenLogprobContent(token=token, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


class TextOffsets:
    """Where each token of one reply starts, in characters of the reply text, token after token
    (a token that ends inside a character is counted where that character starts). An
    incremental decoder keeps this O(1) per token: it holds back an unfinished character."""

    def __init__(self) -> None:
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def next(self, token_bytes: bytes) -> int:
        offset = self.chars
        self.chars += len(self._decoder.decode(token_bytes))
        return offset


def completion_logprobs(tokenizer: TextTokenizer, entries: list[TokenLogprob], offsets: TextOffsets) -> CompletionLogprobs:
    tokens, values, tops, starts = [], [], [], []
    for entry in entries:
        token, raw = _named(tokenizer, entry.token)
        tokens.append(token)
        values.append(entry.logprob)
        tops.append(None if entry.logprob is None else {_named(tokenizer, t)[0]: lp for t, lp in entry.top})
        starts.append(offsets.next(bytes(raw)))
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=starts)
