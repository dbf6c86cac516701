"""DataConfig parsing/validation and reading damaged prepared folders."""

import dataclasses
import json
from pathlib import Path

import ml_collections
import pytest

from minicpm_jax.config import DataConfig, parse_mixture
from minicpm_jax.data import pipeline, records

import data_helpers as dh


@pytest.fixture
def two_dirs(tmp_path):
    a = dh.write_prepared(tmp_path / "a", dh.synthetic_docs(1, 10, 3, 9))
    b = dh.write_prepared(tmp_path / "b", dh.synthetic_docs(2, 10, 3, 9))
    return str(a), str(b)


def test_from_config_dict_reads_and_normalises(two_dirs):
    a, b = two_dirs
    cfg = ml_collections.ConfigDict(
        {"mixtures": {"stable": f"{a}:3, {b}:1", "decay": a}, "shuffle_seed": 5, "num_workers": 0}
    )
    data = DataConfig.from_config(cfg)
    assert data.mixture("stable") == ((a, 0.75), (b, 0.25))
    assert data.mixture("decay") == ((a, 1.0),)
    assert data.shuffle_seed == 5 and data.val_dir == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.shuffle_seed = 1


@pytest.mark.parametrize(
    "spec, match",
    [
        ("a:0", r"data.mixtures.stable: weight of 'a' must be > 0"),
        ("a:-1,b:1", "must be > 0"),
        ("a:x", "must be a number"),
        ("a:1,a:2", "more than once"),
        (" , ", "names no prepared dataset"),
    ],
)
def test_parse_mixture_errors_name_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_mixture(spec, "data.mixtures.stable")


def test_validation_errors_name_key_and_path(two_dirs, tmp_path):
    a, _ = two_dirs
    with pytest.raises(ValueError, match=r"data.mixtures.decay: .*nowhere is not a prepared dataset"):
        DataConfig.from_config({"mixtures": {"stable": a, "decay": str(tmp_path / "nowhere")}})
    with pytest.raises(KeyError, match=r"unknown phase\(s\) \['warmdown'\]"):
        DataConfig.from_config({"mixtures": {"stable": a, "warmdown": a}})
    with pytest.raises(ValueError, match="data.mixtures.stable is required"):
        DataConfig.from_config({"mixtures": {"decay": a}})
    with pytest.raises(KeyError, match="unknown key.*data.shuffle_sed"):
        DataConfig.from_config({"mixtures": {"stable": a}, "shuffle_sed": 1})
    with pytest.raises(ValueError, match="data.num_workers must be >= 0"):
        DataConfig.from_config({"mixtures": {"stable": a}, "num_workers": -1})
    with pytest.raises(ValueError, match="data.val_dir: "):
        DataConfig.from_config({"mixtures": {"stable": a}, "val_dir": str(tmp_path)})


def test_mixing_tokenizers_is_refused(tmp_path, two_dirs):
    a, _ = two_dirs
    other = dh.write_prepared(tmp_path / "other", dh.synthetic_docs(3, 5, 3, 9), sha256="different")
    with pytest.raises(ValueError, match="different tokenizers"):
        DataConfig.from_config({"mixtures": {"stable": f"{a}:1,{other}:1"}})


def test_split_parent_folder_hints_at_train(tmp_path):
    dh.write_prepared(tmp_path / "out" / "train", dh.synthetic_docs(1, 5, 3, 9))
    with pytest.raises(FileNotFoundError, match="use .*out/train"):
        records.read_manifest(tmp_path / "out")


def test_corrupted_shard_is_a_clear_error_naming_it(two_dirs):
    a, _ = two_dirs
    shard = min(Path(a).glob("*.array_record"))
    shard.write_bytes(b"this is not an array record file" * 10)
    with pytest.raises(ValueError, match=f"cannot open shard {shard}"):
        pipeline.make_pipeline(DataConfig.from_config({"mixtures": {"stable": a}}), "stable", 16, 2, 0, 1)


def test_truncated_shard_or_wrong_counts_are_caught(two_dirs):
    a, b = two_dirs
    manifest_path = Path(b) / records.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["num_documents"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="holds 5 records but the manifest says 6"):
        records.open_shards(b)
    shard = Path(a) / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(shard)):
        _, sources = records.open_shards(a)
        [sources[0][i] for i in range(len(sources[0]))]


def test_missing_shard_file_is_named(two_dirs):
    a, _ = two_dirs
    manifest = records.read_manifest(a)
    (Path(a) / manifest["shards"][1]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match=manifest["shards"][1]["file"]):
        records.read_manifest(a)
