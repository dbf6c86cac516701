"""Evaluation: held-out loss and bits per byte (evaluate.py) and the lm-evaluation-harness adapter."""
