"""storage.py on local paths, and its errors for URLs it cannot reach (buckets themselves: test_object_storage.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minicpm_jax import storage
from minicpm_jax.config import parse_mixture


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "config.json"
    storage.write_text(target, "old")
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        storage.write_text(target, "new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"]


def test_copy_stage_and_hash_of_local_files(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 100)
    storage.copy_file(source, tmp_path / "deep" / "b.bin")
    assert (tmp_path / "deep" / "b.bin").read_bytes() == b"x" * 100
    assert storage.stage(source) == str(source)  # a local file is read where it is
    assert storage.sha256(source) == storage.sha256(tmp_path / "deep" / "b.bin")
    assert storage.listdir(tmp_path / "deep") == ["b.bin"] and storage.listdir(tmp_path / "none") == []


def test_text_log_appends_locally_and_rewrites_atomically(tmp_path):
    log = storage.TextLog(tmp_path / "metrics.jsonl")
    log.append("1\n")
    log.append("2\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "1\n2\n"  # locally every line is on disk at once
    log.replace(["1\n"])
    assert storage.TextLog(tmp_path / "metrics.jsonl").lines == ["1\n"]


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("gs://bucket/run") == "gs://bucket/run"
    assert storage.absolute("runs/a") == str(tmp_path / "runs" / "a")
    assert storage.join("gs://bucket/run", "checkpoints", "4") == "gs://bucket/run/checkpoints/4"
    assert parse_mixture("gs://b/web:0.75,gs://b/code", "m") == (("gs://b/web", 0.75 / 1.75), ("gs://b/code", 1 / 1.75))


def test_a_url_without_its_backend_or_with_an_unknown_scheme_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the `s3` extra were not installed
    with pytest.raises(storage.StorageError, match=r"s3://bucket/run: s3:// paths need s3fs: pip install "
                                                   r"'minicpm-jax\[s3\]'"):
        storage.exists("s3://bucket/run")
    with pytest.raises(storage.StorageError, match="ftp://host/run: unsupported URL scheme ftp://"):
        storage.exists("ftp://host/run")


def test_local_paths_need_no_fsspec(tmp_path):
    # fsspec arrives with the gcs/s3 extras (gcsfs, s3fs), not with the core install.
    code = ("import sys; sys.modules['fsspec'] = None\n"
            "from minicpm_jax import storage\n"
            f"storage.write_text({str(tmp_path / 'a.txt')!r}, 'x')\n"
            f"assert storage.read_text({str(tmp_path / 'a.txt')!r}) == 'x'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
