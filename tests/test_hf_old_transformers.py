"""Opt-in: our exports on an older transformers (4.40–4.48, where OpenBMB's MiniCPM code runs), in a second
environment (see minicpm_jax/hf/old_transformers_check.py and the README's Hugging Face conversion section).

    OLD_TRANSFORMERS_PYTHON=/tmp/tf448/bin/python pytest tests/test_hf_old_transformers.py
"""

from __future__ import annotations

import os

import pytest

from minicpm_jax.hf import old_transformers_check

PYTHON = os.environ.get("OLD_TRANSFORMERS_PYTHON")


@pytest.mark.skipif(not PYTHON, reason="set OLD_TRANSFORMERS_PYTHON to the python of a venv with an old "
                                        "transformers (e.g. 4.48), torch, sentencepiece and protobuf")
def test_exports_load_and_tokenize_like_us_on_old_transformers(tmp_path):
    lines, failures = old_transformers_check.run_check(PYTHON, tmp_path)
    assert not failures, "\n".join(lines)
