"""Text streaming on top of token ids: incremental decoding that honours stop strings.

Text is released only once it can no longer turn into a stop string or an unfinished UTF-8
character, so a streamed reply never shows text that the final reply would not contain. Bytes
that never form a character (an invalid sequence, or a reply cut off inside a character) are
dropped rather than shown as U+FFFD.
`TextStream` is the push form (the server feeds it tokens as they arrive from the batching
engine); `stream_text` is the pull form over an iterable of ids (`hybridlm generate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from hybridlm.tokenizer import TextTokenizer


class TextStream:
    """Feed token ids one at a time; each push returns the text that is now safe to show.

    Decoding is incremental, so a reply of n tokens costs O(n) rather than O(n^2): only the ids
    after the last settled point are decoded again (the scheme vLLM uses). `text` holds the
    decoded text up to `read` ids; a push decodes ids[prefix:] and ids[prefix:read] and keeps what
    the new ids add, settling only when that does not end in an unfinished UTF-8 character.
    Decoding from `prefix` (one settled step back) rather than from `read` gives the decoder the
    context it may use at the start of a sequence."""

    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.generated: list[int] = []
        self.text = ""
        self.prefix = self.read = 0
        self.emitted = 0
        self.stopped = False
        """True once a stop string appeared: later tokens add nothing."""

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.generated.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back tail once generation has ended (nothing from a stop string on)."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        self._settle(final)
        text = self.text
        # Released text never holds a stop string, so a new one can only start near its end.
        hits = (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop)
        hit = min((i for i in hits if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            return self._release(text, hit)
        return self._release(text, len(text) if final else len(text) - _held_back(text, self.stop))

    def _settle(self, final: bool) -> None:
        """Extend `text` with what the ids after `read` add, once they end on a whole character."""
        before = self.tokenizer.decode(self.generated[self.prefix : self.read])
        after = self.tokenizer.decode(self.generated[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :].replace("\ufffd", "")  # the decoder's stand-in for bad bytes
            self.prefix, self.read = self.read, len(self.generated)

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : upto], upto
        return piece


def stream_text(tokenizer: TextTokenizer, ids: Iterable[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield text pieces of the decoded ids; end at (and drop) the first stop string."""
    stream = TextStream(tokenizer, stop)
    for token in ids:
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    tail = stream.flush()
    if tail:
        yield tail


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters might still become a stop string or a whole character."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
