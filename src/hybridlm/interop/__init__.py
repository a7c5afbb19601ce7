"""Interoperability with other tools: Hugging Face transformers export and import, lm-evaluation-harness."""
