"""Alignment: supervised fine-tuning on chat data (sft.py) and direct preference optimisation (dpo.py)."""
