"""prepare-data: shards, manifest, split, bad input."""

import json

import pytest

from minicpm_jax.data import prepare, records
from minicpm_jax.data.tokenizer import Tokenizer

import data_helpers


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return data_helpers.train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def _stored_texts(prepared_dir, tok):
    manifest, shards = records.open_shards(prepared_dir)
    texts = []
    for shard in shards:
        for i in range(len(shard)):
            ids = shard[i].tolist()
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            texts.append(tok.decode(ids[1:-1]))
    return manifest, texts


def test_every_document_stored_once_with_right_counts(tmp_path, tok_path):
    texts = data_helpers.sample_texts(50, seed=1)
    with open(tmp_path / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "meta": 1}) + "\n" for t in texts[:30])
    (tmp_path / "docs").mkdir()
    for i, t in enumerate(texts[30:]):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(t)
    out = tmp_path / "out"
    manifest = prepare.prepare_data([tmp_path / "a.jsonl", tmp_path / "docs"], tok_path, out, num_shards=3)["all"]

    tok = Tokenizer(tok_path)
    on_disk, stored = _stored_texts(out, tok)
    assert on_disk == manifest
    assert sorted(stored) == sorted(texts)
    assert manifest["num_documents"] == 50
    assert [s["num_documents"] for s in manifest["shards"]] == [17, 17, 16]
    expected_tokens = sum(len(tok.encode(t)) + 2 for t in texts)
    assert manifest["num_tokens"] == sum(s["num_tokens"] for s in manifest["shards"]) == expected_tokens
    num_bytes = sum(len(t.encode()) for t in texts)
    assert manifest["bytes_per_token"] == pytest.approx(num_bytes / (expected_tokens - 100))
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["skipped"] == {}
    assert manifest["format_version"] == records.FORMAT_VERSION


def test_paragraph_mode_splits_on_blank_lines(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text("first block\nstill first\n\n  \nsecond block\n\n\nthird")
    manifest = prepare.prepare_data([tmp_path / "a.txt"], tok_path, tmp_path / "out", text_mode="paragraphs")["all"]
    _, stored = _stored_texts(tmp_path / "out", Tokenizer(tok_path))
    assert stored == ["first block\nstill first", "second block", "third"]
    assert manifest["num_documents"] == 3


def test_val_split_is_disjoint_complete_and_deterministic(tmp_path, tok_path):
    texts = data_helpers.sample_texts(200, seed=2)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = Tokenizer(tok_path)
    splits = []
    for run in ("a", "b"):
        manifests = prepare.prepare_data([tmp_path / "in.jsonl"], tok_path, tmp_path / run, val_fraction=0.2, seed=7)
        assert set(manifests) == {"train", "val"}
        splits.append({name: _stored_texts(tmp_path / run / name, tok)[1] for name in ("train", "val")})
    train, val = splits[0]["train"], splits[0]["val"]
    assert splits[0] == splits[1]
    assert sorted(train + val) == sorted(texts)
    assert not set(train) & set(val)
    assert 20 <= len(val) <= 60  # ~40 expected


def test_bad_lines_are_counted_by_reason_not_crashing(tmp_path, tok_path):
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "broken json',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        b'{"text": "bad utf8 \xff\xfe"}',
        b'{"text": "lone surrogate \\ud800"}',
        b"",
        json.dumps({"text": "good two"}).encode(),
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9")
    manifest = prepare.prepare_data([tmp_path / "in.jsonl", tmp_path / "bad.txt"], tok_path, tmp_path / "out")["all"]
    assert manifest["num_documents"] == 2
    assert manifest["skipped"] == {
        "invalid_utf8": 3,
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "field_not_string": 1,
        "empty_document": 1,
    }
    _, stored = _stored_texts(tmp_path / "out", Tokenizer(tok_path))
    assert sorted(stored) == ["good one", "good two"]


def test_all_lines_bad_is_an_error_naming_the_field(tmp_path, tok_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no documents.*missing_field.*'text'"):
        prepare.prepare_data([tmp_path / "in.jsonl"], tok_path, tmp_path / "out")


def test_missing_input_is_named_before_any_work(tmp_path, tok_path):
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        prepare.prepare_data([tmp_path / "ok.txt", tmp_path / "missing.jsonl"], tok_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_prepared_folder(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text("fine")
    prepare.prepare_data([tmp_path / "a.txt"], tok_path, tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds"):
        prepare.prepare_data([tmp_path / "a.txt"], tok_path, tmp_path / "out")


def test_parquet_input(tmp_path, tok_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha doc", None, "beta doc"]}), tmp_path / "in.parquet")
    manifest = prepare.prepare_data([tmp_path / "in.parquet"], tok_path, tmp_path / "out", text_field="content")["all"]
    assert manifest["num_documents"] == 2
    assert manifest["skipped"] == {"missing_field": 1}
    with pytest.raises(KeyError, match="no column 'text'"):
        prepare.prepare_data([tmp_path / "in.parquet"], tok_path, tmp_path / "out2")
