"""Model converters: the one mechanism that rewrites Linear layers (LoRA adapters; quantization)."""
