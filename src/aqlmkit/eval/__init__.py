"""Evaluation: perplexity with the papers' protocol, and JSON/PNG reports."""
