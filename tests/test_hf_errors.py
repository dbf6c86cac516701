"""Bad HF folders fail with the tensor or key named, and expected vs found."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from minicpm_jax import hf
from minicpm_jax.config import ConfigError
from minicpm_jax.model import MiniCPM

from conftest import tiny_config


@pytest.fixture
def exported(tmp_path):
    hf.save_hf(MiniCPM(tiny_config(), rngs=nnx.Rngs(0)), None, tmp_path, arch="minicpm")
    return tmp_path


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(exported):
    _edit_tensors(exported, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointFormatError,
                       match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \(160, 64\)"):
        hf.load_hf(exported)


def test_wrong_shape_names_tensor_expected_and_found(exported):
    def shrink(tensors):
        tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _edit_tensors(exported, shrink)
    with pytest.raises(hf.CheckpointFormatError,
                       match=r"tensor model\.layers\.2\.self_attn\.k_proj\.weight has shape \(16, 64\), "
                             r"expected \(32, 64\)"):
        hf.load_hf(exported)


def test_heads_not_dividing_hidden_names_the_key(exported):
    _edit_config(exported, num_attention_heads=5)
    with pytest.raises(ConfigError, match=r"config\.json: model\.num_heads=5 must divide model\.hidden_size=64"):
        hf.load_hf(exported)


def test_missing_required_key_is_named(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["intermediate_size"]
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="required key 'intermediate_size' is missing"):
        hf.load_hf(exported)


def test_unexpected_tensor_is_reported(exported):
    _edit_tensors(exported, lambda t: t.update({"model.layers.0.mlp.experts.0.w1.weight": np.zeros((2, 2))}))
    with pytest.raises(hf.CheckpointFormatError, match=r"unexpected tensors .*experts\.0\.w1"):
        hf.load_hf(exported)


def test_unsupported_rope_scaling_is_refused(exported):
    _edit_config(exported, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="RoPE type 'yarn' is not supported"):
        hf.load_hf(exported)


def test_longrope_factors_of_the_wrong_length_name_the_key(exported):
    _edit_config(exported, rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 8,
                                         "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match=r"model\.rope_short_factor has 3 values; longrope needs head_dim/2 = 8"):
        hf.load_hf(exported)


def test_missing_shard_is_named(tmp_path):
    files = hf.save_hf(MiniCPM(tiny_config(), rngs=nnx.Rngs(0)), None, tmp_path, max_shard_bytes=100_000)
    second_shard = [f for f in files if f.endswith(".safetensors")][1]
    (tmp_path / second_shard).unlink()
    with pytest.raises(hf.CheckpointFormatError, match=f"shard {second_shard} named in model.safetensors.index.json"):
        hf.load_hf(tmp_path)


def test_pickle_checkpoint_is_never_loaded_implicitly(exported):
    (exported / "model.safetensors").rename(exported / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointFormatError, match="never loaded implicitly.*convert-bin"):
        hf.load_hf(exported)


def test_export_refuses_to_mix_with_an_existing_checkpoint(exported):
    model = MiniCPM(tiny_config(), rngs=nnx.Rngs(0))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        hf.save_hf(model, None, exported)
    with pytest.raises(ConfigError, match="arch must be one of"):
        hf.save_hf(model, None, exported, arch="llama", overwrite=True)
