"""What a run was made from, kept in its directory, so that every command works on it from any working
directory, and on another machine or bucket it is copied to.

    RUN/tokenizer.model     a copy of the run's tokenizer: data.tokenizer, else the one its data was prepared
                            with; a derived run's comes from its source run, an import's from the HF folder
    RUN/data_sources.json   every prepared folder the run has read: its absolute path or URL and the sha256 of
                            its manifest.json (which holds each shard's sha256); a resume checks it again

The run's copy is its tokenizer from then on: `read_run_config` puts it in data.tokenizer (the path given at
the start may be gone on another machine). Data stays where it is: a run copied elsewhere resumes where its
prepared folders are reachable under the same URLs (a bucket).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import ml_collections

from minicpm_jax import storage
from minicpm_jax.config import ConfigError, DataConfig
from minicpm_jax.data import records
from minicpm_jax.files import read_json, write_json

TOKENIZER_FILE = "tokenizer.model"
SOURCES_FILE = "data_sources.json"

log = logging.getLogger(__name__)


def tokenizer_copy(workdir: str) -> str | None:
    """RUN/tokenizer.model when the run holds one."""
    path = storage.join(workdir, TOKENIZER_FILE)
    return path if storage.is_file(path) else None


def run_tokenizer(workdir: str, cfg: ml_collections.ConfigDict) -> str | None:
    """The tokenizer of a run: its own copy, else the config's data.tokenizer; None when it has neither."""
    return tokenizer_copy(workdir) or cfg.get("data", {}).get("tokenizer") or None


def record(workdir: str, cfg: ml_collections.ConfigDict, inherited_tokenizer: str | None = None) -> None:
    """Keeps a copy of the run's tokenizer unless the run already holds one: the config's data.tokenizer, else
    `inherited_tokenizer` (a source run's, an HF folder's), else the one its data was prepared with. Records the
    sha256 of every prepared folder `cfg` reads in RUN/data_sources.json."""
    folders = data_folders(cfg)
    if tokenizer_copy(workdir) is None:
        source = cfg.get("data", {}).get("tokenizer") or inherited_tokenizer or _data_tokenizer(folders)
        if source:
            storage.copy_file(source, storage.join(workdir, TOKENIZER_FILE))
        else:
            log.warning("%s: no tokenizer to keep (data.tokenizer is empty and the data names no tokenizer file); "
                        "generate and export-hf will need --tokenizer", workdir)
    if folders:
        recorded = _recorded(workdir)
        write_json(storage.join(workdir, SOURCES_FILE),
                   {**recorded, **{folder: {"manifest_sha256": sha} for folder, sha in manifest_digests(cfg).items()}},
                   sort_keys=True)


def check_data_sources(workdir: str, cfg: ml_collections.ConfigDict, allow_change: bool = False,
                       writer: bool = True) -> None:
    """ConfigError naming each prepared folder whose manifest changed since the run recorded it (re-prepared data
    would silently change what a resumed run reads). With `allow_change` (train --allow-data-change) the
    change is accepted instead: logged, and recorded (by the `writer` process) in RUN/data_sources.json with the
    time and both digests."""
    recorded = _recorded(workdir)
    changed = {folder: sha for folder in data_folders(cfg) if folder in recorded
               for sha in [_manifest_sha256(folder)] if sha != recorded[folder]["manifest_sha256"]}
    if not changed:
        return
    described = ", ".join(f"{folder} (recorded sha256 {recorded[folder]['manifest_sha256'][:12]}…, now {sha[:12]}…)"
                          for folder, sha in changed.items())
    if not allow_change:
        raise ConfigError(f"{workdir} was trained on other data than its prepared folders now hold: {described}; "
                          f"restore that data, start a new --workdir, or resume with --allow-data-change")
    log.warning("%s resumes on changed data (--allow-data-change): %s", workdir, described)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for folder, sha in changed.items():
        entry = recorded[folder]
        entry["changes"] = [*entry.get("changes", []), {"time": stamp, "from": entry["manifest_sha256"], "to": sha}]
        entry["manifest_sha256"] = sha
    if writer:
        write_json(storage.join(workdir, SOURCES_FILE), recorded, sort_keys=True)


def manifest_digests(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """{prepared folder: sha256 of its manifest} of every folder `cfg` reads."""
    return {folder: _manifest_sha256(folder) for folder in data_folders(cfg)}


def data_folders(cfg: ml_collections.ConfigDict) -> list[str]:
    """The prepared folders a config reads (every phase's mixture and data.val_dir), as written there."""
    if "data" not in cfg or not cfg.data.get("mixtures", {}).get("stable"):
        return []
    data = DataConfig.from_config(cfg.data, check_paths=False)
    folders = [path for mixture in data.mixtures.values() for path, _ in mixture] + [data.val_dir]
    return list(dict.fromkeys(folder for folder in folders if folder))


def _manifest_sha256(folder: str) -> str:
    try:
        return hashlib.sha256(storage.read_bytes(storage.join(folder, records.MANIFEST_NAME))).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is not a prepared dataset: no {records.MANIFEST_NAME}") from None


def _recorded(workdir: str) -> dict[str, Any]:
    path = storage.join(workdir, SOURCES_FILE)
    return read_json(path) if storage.is_file(path) else {}


def _data_tokenizer(folders: list[str]) -> str | None:
    """The tokenizer file the data was prepared with, where it still exists with the recorded content."""
    for folder in folders:
        tokenizer = records.read_manifest(folder).get("tokenizer", {})
        path = tokenizer.get("path", "")
        if path and storage.is_file(path) and storage.sha256(path) == tokenizer.get("sha256"):
            return path
    return None
