"""`export-hf --arch minicpm --remote-code`: transformers loads the export through config.json's auto_map and our
own configuration_minicpm.py / modeling_minicpm.py, with our logits, and generates with its KV cache."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import hf
from minicpm_jax.hf.remote_code import AUTO_MAP, FILES
from minicpm_jax.model import MiniCPM

from conftest import relative_max_error, tiny_config, torch_logits

TOLERANCE = 1e-5

CASES = {
    "gqa_tied": {},
    "untied": dict(tie_word_embeddings=False),
    "moe": dict(num_experts=4, num_experts_per_tok=2),
    "dynamic_ntk_past_max_positions": dict(rope_scaling="dynamic", rope_factor=4.0, max_position_embeddings=32),
    "linear": dict(rope_scaling="linear", rope_factor=2.0),
}


@pytest.mark.parametrize("case", [c if c == "gqa_tied" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_remote_code_loads_with_our_logits(case, tokens, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = MiniCPM(tiny_config(**CASES[case]), rngs=nnx.Rngs(1))
    files = hf.save_hf(model, None, tmp_path, arch="minicpm", remote_code=True)
    assert set(FILES) <= set(files)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reference).__name__ == "MiniCPMForCausalLM"
    error = relative_max_error(model(jnp.asarray(tokens)), torch_logits(reference, tokens))
    assert error <= TOLERANCE, f"{case}: relative max error {error:.2e}"

    prompt = torch.from_numpy(tokens[:, :8].astype(np.int64))
    with torch.no_grad():
        cached = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                    do_sample=False)
        uncached = prompt
        for _ in range(6):
            next_token = reference(uncached, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            uncached = torch.cat([uncached, next_token], dim=1)
    assert torch.equal(cached, uncached)


def test_without_the_option_no_code_is_written_but_auto_map_is(tmp_path):
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(1))
    files = hf.save_hf(model, None, tmp_path, arch="minicpm")
    assert not set(FILES) & set(files) and not any((tmp_path / name).exists() for name in FILES)
    # OpenBMB's files, dropped into the folder, are found through the same auto_map.
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_remote_code_is_refused_where_it_cannot_serve(tmp_path):
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="minicpm layout"):
        hf.save_hf(model, None, tmp_path / "g", arch="granite", remote_code=True)
    longrope = MiniCPM(tiny_config(rope_scaling="longrope", rope_factor=2.0, max_position_embeddings=256,
                                   rope_original_max_position_embeddings=128, rope_short_factor=[1.0] * 8,
                                   rope_long_factor=[2.0] * 8), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="longrope"):
        hf.save_hf(longrope, None, tmp_path / "l", arch="minicpm", remote_code=True)
    assert not (tmp_path / "g").exists() and not (tmp_path / "l").exists()
