"""Helpers for tests and benchmarks that ship with capdiff: an offline Hugging Face hub of the real repos."""
