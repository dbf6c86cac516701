"""Data layer: tokenizer and chat template, prepare-data (ArrayRecord shards), Grain pipeline.

Modules are imported where used (`from minicpm_jax.data import pipeline`) so that the CLI and
tokenizer-only users do not pay for Grain's import.
"""
