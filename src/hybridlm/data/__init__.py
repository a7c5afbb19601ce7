"""Data: document sources, the built-in corpus, token shards and the batch loader."""
