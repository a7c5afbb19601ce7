"""Inference: sampling, the token-id engine, and text streaming with stop strings."""
