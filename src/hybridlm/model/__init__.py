"""The hybrid-attention transformer: layout, attention kinds, blocks, caches, size figures."""

from hybridlm.model.transformer import HybridLM

__all__ = ["HybridLM"]
