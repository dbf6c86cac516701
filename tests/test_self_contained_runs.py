"""A run directory is self-contained: made with relative paths in one directory, it works from any other one,
and a copy of it resumes, exports and generates where the tokenizer it was started with no longer exists.

The run keeps its tokenizer (RUN/tokenizer.model) and each data source's absolute path with the sha256 of its
manifest (RUN/data_sources.json); export-hf checks every input before it writes a file; import-hf keeps the HF
folder's tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from minicpm_jax import cli
from minicpm_jax.config import ConfigError
from minicpm_jax.data.prepare import prepare_data
from minicpm_jax.run import checkpoint

from align_helpers import copy_interrupted_at
from data_helpers import sample_texts, train_small_tokenizer
from train_helpers import assert_same_run, tiny_run_config, train_run

RELATIVE = dict(model__vocab_size=512, data__tokenizer="tok.model", data__val_dir="data/val")


@pytest.fixture(scope="module")
def made_here(tmp_path_factory) -> Path:
    """A finished 12-step run trained in `here/` with relative paths only (data, tokenizer, run directory)."""
    here = tmp_path_factory.mktemp("here")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(here)
        train_small_tokenizer(Path("."))
        Path("raw").mkdir()
        for index, text in enumerate(sample_texts(200)):
            Path("raw", f"{index}.txt").write_text(text)
        prepare_data(["raw"], "tok.model", "data", val_fraction=0.1, num_shards=2)
        train_run(tiny_run_config(Path("data/train"), **RELATIVE), Path("runs/run"))
    return here


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_run_records_absolute_paths_its_tokenizer_and_its_datas_hashes(made_here):
    run = made_here / "runs" / "run"
    stored = json.loads((run / "config.json").read_text())["data"]
    assert stored["mixtures"]["stable"] == f"{made_here / 'data' / 'train'}:1"
    assert (stored["val_dir"], stored["tokenizer"]) == (str(made_here / "data" / "val"), str(made_here / "tok.model"))
    assert (run / "tokenizer.model").read_bytes() == (made_here / "tok.model").read_bytes()
    sources = json.loads((run / "data_sources.json").read_text())
    assert set(sources) == {str(made_here / "data" / "train"), str(made_here / "data" / "val")}
    assert all(len(source["manifest_sha256"]) == 64 for source in sources.values())


def test_generate_eval_and_export_work_from_another_directory(made_here, elsewhere, capsys):
    run = str(made_here / "runs" / "run")
    assert cli.main(["generate", "--model", run, "--prompt", "the quick", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("the quick")
    assert cli.main(["eval", "--model", run, "--data", str(made_here / "data" / "val"), "--seq-len", "32",
                     "--batch-size", "4", "--out", "eval.json"]) == 0
    assert json.loads((elsewhere / "eval.json").read_text())["held_out"]
    assert cli.main(["export-hf", "--workdir", run, "--out", "hf", "--arch", "granite"]) == 0
    assert (elsewhere / "hf" / "tokenizer.model").read_bytes() == (made_here / "tok.model").read_bytes()


def test_a_copy_resumes_and_generates_where_its_original_tokenizer_is_gone(made_here, elsewhere, capsys):
    moved = elsewhere / "moved"
    copy = copy_interrupted_at(made_here / "runs" / "run", 8, moved / "run")
    tokenizer = made_here / "tok.model"
    hidden = tokenizer.rename(made_here / "tok.hidden")
    try:
        train_run(None, copy)  # its own config, its own tokenizer copy; the data at its recorded absolute paths
        assert_same_run(copy, made_here / "runs" / "run", 12)
        assert cli.main(["generate", "--model", str(copy), "--prompt", "the", "--max-new-tokens", "2"]) == 0
        assert capsys.readouterr().out.startswith("the")
    finally:
        hidden.rename(tokenizer)


def test_a_resume_refuses_data_that_changed_since_the_run_recorded_it(made_here, elsewhere):
    copy = copy_interrupted_at(made_here / "runs" / "run", 8, elsewhere / "run")
    data = shutil.copytree(made_here / "data", elsewhere / "data")
    config = json.loads((copy / "config.json").read_text())
    config["data"]["mixtures"]["stable"] = f"{data / 'train'}:1"
    (copy / "config.json").write_text(json.dumps(config))
    recorded = json.loads((copy / "data_sources.json").read_text())[str(made_here / "data" / "train")]
    (copy / "data_sources.json").write_text(json.dumps({str(data / "train"): recorded}))
    manifest = json.loads((data / "train" / "manifest.json").read_text())
    (data / "train" / "manifest.json").write_text(json.dumps({**manifest, "num_tokens": manifest["num_tokens"] + 1}))
    with pytest.raises(ConfigError, match=f"trained on other data.*{re.escape(str(data / 'train'))}.*"
                                          f"--allow-data-change"):
        train_run(None, copy)

    # Asked for, the change is accepted once and recorded with both digests; the run then trains to its end.
    from minicpm_jax.train import loop as train_lib

    train_lib.train(train_lib.prepare_workdir(str(copy), None, allow_data_change=True), str(copy))
    (change,) = json.loads((copy / "data_sources.json").read_text())[str(data / "train")]["changes"]
    assert change["from"] == recorded["manifest_sha256"] != change["to"] and change["time"].endswith("Z")
    train_run(None, copy)  # the new data is now the recorded data


@pytest.mark.parametrize("tokenizer", ["missing.model", "not_a_tokenizer.model"])
def test_export_checks_its_tokenizer_before_writing_anything(made_here, elsewhere, tokenizer, capsys):
    (elsewhere / "not_a_tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert cli.main(["export-hf", "--workdir", str(made_here / "runs" / "run"), "--out", "hf",
                     "--tokenizer", tokenizer]) == 2
    assert tokenizer in capsys.readouterr().err
    assert not (elsewhere / "hf").exists()


def test_import_keeps_the_hf_folders_tokenizer(made_here, elsewhere, capsys):
    assert cli.main(["export-hf", "--workdir", str(made_here / "runs" / "run"), "--out", "hf"]) == 0
    assert cli.main(["import-hf", "--hf", "hf", "--workdir", "imported"]) == 0
    assert (elsewhere / "imported" / "tokenizer.model").read_bytes() == (made_here / "tok.model").read_bytes()
    assert checkpoint.read_run_config("imported").get("data") is None  # an import's config holds the model only
    capsys.readouterr()
    assert cli.main(["generate", "--model", "imported", "--prompt", "the", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("the")
