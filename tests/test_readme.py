"""The README's Python snippets run as written, in order, in one namespace: the public API works as documented.

Only the folders they name are swapped for real ones made here (a random MiniCPM saved in HF format, with
a tokenizer), since the README points at a downloaded checkpoint and at `make demo`'s output.
"""

from __future__ import annotations

import re
import shutil

import pytest

from minicpm_jax import hf
from minicpm_jax.infer.inference import HF_TOKENIZER_FILE
from minicpm_jax.model import MiniCPM

from conftest import tiny_config
from data_helpers import train_small_tokenizer
from train_helpers import REPO


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random tiny MiniCPM in HF format, with the tokenizer an HF folder carries."""
    from flax import nnx

    folder = tmp_path_factory.mktemp("hf") / "minicpm"
    cfg = tiny_config(num_layers=2, vocab_size=400)  # the tokenizer's 400 pieces
    hf.save_hf(MiniCPM(cfg, rngs=nnx.Rngs(0)), cfg, folder, arch="minicpm")
    shutil.copy(train_small_tokenizer(tmp_path_factory.mktemp("tok")), folder / HF_TOKENIZER_FILE)
    return folder


@pytest.mark.slow
def test_readme_python_snippets_run_as_documented(hf_folder, tmp_path, monkeypatch):
    snippets = _snippets()
    assert len(snippets) == 3, "a README Python snippet was added or removed: run it here too"
    folders = {'"MiniCPM-2B-safetensors"': repr(str(hf_folder)), '"out_dir"': repr(str(tmp_path / "out_dir")),
               '"demo_out/runs/decay_from_120"': repr(str(hf_folder))}
    monkeypatch.chdir(REPO)  # the snippets name configs/ relative to the repository
    namespace: dict = {}
    for snippet in snippets:
        for placeholder, real in folders.items():
            snippet = snippet.replace(placeholder, real)
        exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (1, 16, namespace["cfg"].model.vocab_size)
    assert type(namespace["hf_model"]).__name__ == "GraniteForCausalLM"
