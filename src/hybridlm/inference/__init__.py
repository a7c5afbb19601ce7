"""Inference on token ids: sampling, decode.py (one sequence, or n samples of one prompt, decoded to
the end) and scheduler.py (continuous batching of many requests, for the server), plus text
streaming with stop strings."""
