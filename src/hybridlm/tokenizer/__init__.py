"""Tokenizers: training byte-level BPE / Unigram with Hugging Face `tokenizers`, and loading them."""

from hybridlm.tokenizer.text_tokenizer import SPECIAL_TOKENS, TextTokenizer
from hybridlm.tokenizer.train import train_tokenizer

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "train_tokenizer"]
