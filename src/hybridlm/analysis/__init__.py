"""Analyses of trained runs: what the attention heads do (`hybridlm analyze heads`)."""
