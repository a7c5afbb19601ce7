"""Train a byte-level tokenizer (BPE or Unigram) that round-trips any Unicode text exactly.

Both kinds split text with the byte-level pre-tokenizer and start from all 256 byte symbols,
so nothing is ever unknown and decoding gives back the original bytes.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hybridlm.errors import UserError
from hybridlm.tokenizer.text_tokenizer import SPECIAL_TOKENS, TextTokenizer

KINDS = ("bpe", "unigram")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 8192) -> TextTokenizer:
    """Learn a vocabulary of at most `vocab_size` tokens from `texts`."""
    if kind not in KINDS:
        raise UserError(f"tokenizer kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab size {vocab_size} is too small: it needs at least {MIN_VOCAB} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    specials = list(SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        hf = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
    else:
        hf = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    seen = _CountingIterator(texts)
    hf.train_from_iterator(seen, trainer=trainer)
    if seen.count == 0:
        raise UserError("no text to train the tokenizer on: the sources are empty")
    return TextTokenizer(hf)


class _CountingIterator:
    """Pass texts through while counting the non-empty ones, to catch empty inputs."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = iter(texts)
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text:
                self.count += 1
                yield text
