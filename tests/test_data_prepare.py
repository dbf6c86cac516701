"""prepare-data: shards, manifest, split, bad input."""

import json
import random

import pytest

from minicpm_jax.data import prepare, readers, records, tokenizer
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


def _old_read_text(path, text_mode):
    """What the plain-text reader gave before it streamed: the whole file read, split and decoded at once."""
    raw = path.read_bytes()
    blocks = [raw] if text_mode == "file" else readers._BLANK_LINES.split(raw)
    skips, docs = readers.SkipCounter(), []
    for i, block in enumerate(blocks):
        where = str(path) if text_mode == "file" else f"{path} block {i + 1}"
        text = readers._decode(block, where, skips)
        if text is not None:
            docs.append((where, text))
    return docs, skips.as_dict()


_BYTE_PIECES = [b"a", b"bc", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\n\n", b" \n", "模".encode(), "😀".encode(),
                "模".encode()[:2], b"\xff"]


@pytest.mark.parametrize("text_mode", readers.TEXT_MODES)
def test_streamed_reading_gives_the_documents_and_skips_of_reading_whole(tmp_path, monkeypatch, text_mode):
    rng = random.Random(text_mode)
    for n in range(60):
        path = tmp_path / f"{n}.txt"
        path.write_bytes(b"".join(rng.choice(_BYTE_PIECES[:-2] if n % 3 else _BYTE_PIECES)
                                  for _ in range(rng.randint(0, 40))))
        expected = _old_read_text(path, text_mode)
        for block_bytes in (1, 2, 5, 4096):
            monkeypatch.setattr(readers, "READ_BLOCK_BYTES", block_bytes)
            skips, docs = readers.SkipCounter(), []
            for doc in readers.iter_texts(path, text_mode=text_mode, skips=skips):
                text = "".join(doc)  # a streamed document is judged once read
                if doc.ok:
                    docs.append((doc.where, text))
            assert (docs, skips.as_dict()) == expected, (path.read_bytes(), block_bytes)
            # A consumer that reads no document still gets every one in turn (the reader reads on to the end
            # of an unread streamed one, which may then turn out bad) and the same skips.
            skips = readers.SkipCounter()
            wheres = [doc.where for doc in readers.iter_texts(path, text_mode=text_mode, skips=skips)]
            good = [where for where, _ in expected[0]]
            assert [w for w in wheres if w in good] == good and skips.as_dict() == expected[1]


@pytest.mark.parametrize("text_mode", readers.TEXT_MODES)
def test_streamed_long_documents_are_prepared_exactly_as_whole_ones(tmp_path, tok_path, monkeypatch, text_mode):
    rng = random.Random(3)
    (tmp_path / "in").mkdir()
    for i, text in enumerate(data_helpers.sample_texts(12, seed=4)):
        long_text = " ".join([text] * rng.randint(1, 6))
        if text_mode == "paragraphs":
            long_text = "\n\n \n".join([long_text, "short one", long_text + "\n"])
        (tmp_path / "in" / f"{i:02d}.txt").write_text(long_text)
    (tmp_path / "in" / "bad.txt").write_bytes(b"fine start " * 20 + b"\xff")
    (tmp_path / "in" / "blank.txt").write_bytes(b" \n\t" * 50)
    (tmp_path / "in" / "long.jsonl").write_text("".join(json.dumps({"text": t * 9}) + "\n"
                                                        for t in data_helpers.sample_texts(5, seed=5)))
    inputs = [tmp_path / "in"]
    kwargs = dict(text_mode=text_mode, num_shards=2, val_fraction=0.3, seed=1)
    whole = prepare.prepare_data(inputs, tok_path, tmp_path / "whole", **kwargs)

    streamed = []
    real = prepare._streamed_example
    monkeypatch.setattr(prepare, "_streamed_example", lambda *a: streamed.append(1) or real(*a))
    monkeypatch.setattr(readers, "READ_BLOCK_BYTES", 64)
    monkeypatch.setattr(prepare, "_LONG_DOCUMENT_CHARS", 64)
    monkeypatch.setattr(tokenizer, "STREAM_CHUNK_CHARS", 16)
    chunked = prepare.prepare_data(inputs, tok_path, tmp_path / "chunked", **kwargs)
    assert len(streamed) > 12
    assert chunked == whole  # counts, bytes per token, skips, the split and every shard's sha256
    assert whole["train"]["skipped"] == {"invalid_utf8": 1, "empty_document": 1 if text_mode == "file" else 2}
    assert whole["train"]["num_documents"] and whole["val"]["num_documents"]
