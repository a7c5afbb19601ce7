"""Evaluation: perplexity and bits per byte, and the unigram baseline."""
