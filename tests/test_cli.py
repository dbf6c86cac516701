"""The console script end to end: convert-bin → import-hf → export-hf, and params."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from minicpm_jax import cli
from minicpm_jax.run import checkpoint

from conftest import random_granite, relative_max_error, tiny_config, torch_logits


def test_convert_bin_then_import_then_export_keeps_the_logits(tmp_path, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    # An original-style upload: config.json + a pickled pytorch_model.bin (tied: lm_head shares storage).
    reference = random_granite(tiny_config(tie_word_embeddings=True))
    reference.config.save_pretrained(tmp_path / "bin")
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")

    assert cli.main(["convert-bin", "--hf", str(tmp_path / "bin"), "--out", str(tmp_path / "safe")]) == 0
    assert (tmp_path / "safe" / "model.safetensors").is_file()
    assert not list((tmp_path / "safe").glob("*.bin"))
    assert cli.main(["import-hf", "--hf", str(tmp_path / "safe"), "--workdir", str(tmp_path / "run")]) == 0
    model, cfg = checkpoint.restore_model(str(tmp_path / "run"))
    assert cfg.model.num_kv_heads == 2
    expected = torch_logits(reference, tokens)
    assert relative_max_error(model(jnp.asarray(tokens)), expected) <= 1e-4

    assert cli.main(["export-hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                     "--arch", "granite"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(exported, tokens), expected, rtol=0, atol=1e-5)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["export-hf", "--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a run directory: config.json is missing" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": tiny_config().to_dict()}))
    assert cli.main(["export-hf", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "has no committed checkpoint" in capsys.readouterr().err


def test_params_command_via_the_console_script():
    result = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "params", "--config", "configs/minicpm_1b.py"],
                            capture_output=True, text=True, check=True)
    assert "non-embedding parameters: 1,247,442,432" in result.stdout
    result = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "params", "--config", "configs/demo.py",
                             "--config.model.num_heads=3"], capture_output=True, text=True)
    assert result.returncode == 2 and "model.num_heads=3 must divide model.hidden_size=256" in result.stderr
