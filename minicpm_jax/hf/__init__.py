"""Hugging Face checkpoints both ways: load_hf / save_hf (convert.py), the config mapping (config.py), RoPE
scaling keys (rope.py), the tokenizer (tokenizer.py) and the explicit .bin conversion step (convert_bin.py)."""

from minicpm_jax.hf.convert import SAFE_INDEX, SAFE_SINGLE, CheckpointFormatError, hf_tensors, load_hf, save_hf

__all__ = ["SAFE_INDEX", "SAFE_SINGLE", "CheckpointFormatError", "hf_tensors", "load_hf", "save_hf"]
