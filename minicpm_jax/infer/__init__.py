"""Inference: KV-cache generation (generate.py) and loading a run or HF folder for it (inference.py)."""
