"""Checkpoint formats: the AQLM Hugging Face layout, plain HF models, GGUF."""
