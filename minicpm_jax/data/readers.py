"""Reads documents from plain text, JSONL or Parquet files, counting bad input instead of crashing.

Formats, chosen by file extension:
  *.jsonl    one JSON object per line; the document is the string in `text_field`.
  *.parquet  one document per row, column `text_field` (needs `pip install pyarrow`).
  other      plain UTF-8 text: `text_mode="file"` makes the whole file one document,
             `text_mode="paragraphs"` makes each blank-line-separated block one document.
A directory given as input stands for every non-hidden file below it, in sorted order.

Bad input never passes as data and never stops the job: each skip is counted under one of
SKIP_REASONS and the first few are logged with file and line.
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from minicpm_jax.errors import UserError

TEXT_MODES = ("file", "paragraphs")
SKIP_REASONS = (
    "invalid_utf8",  # bytes that are not UTF-8, or JSON escapes that make lone surrogates
    "invalid_json",  # a JSONL line that does not parse
    "not_an_object",  # a JSONL line that parses to something other than an object
    "missing_field",  # the object/row has no `text_field` (or it is null)
    "field_not_string",  # the field holds a number, list, ...
    "empty_document",  # nothing but whitespace
    "bad_conversation",  # chat/preference JSONL: messages or prompt/chosen/rejected malformed
)
_LOGGED_PER_REASON = 5
_BLANK_LINES = re.compile(rb"\r?\n(?:[ \t\r]*\n)+")  # a line break then one or more blank lines

log = logging.getLogger(__name__)


class InputFileError(UserError, ValueError):
    """An input file that cannot be read as what its name says (a .parquet that is not Parquet)."""


class MissingColumnError(UserError, KeyError):
    """A table without the column that holds the text."""


class SkipCounter:
    """Counts skipped input by reason and logs the first few of each with their location."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, reason: str, where: str) -> None:
        assert reason in SKIP_REASONS, reason
        self.counts[reason] += 1
        if self.counts[reason] <= _LOGGED_PER_REASON:
            log.warning("skipping %s: %s", where, reason.replace("_", " "))

    def as_dict(self) -> dict[str, int]:
        return {reason: self.counts[reason] for reason in SKIP_REASONS if self.counts[reason]}


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named by `inputs` (directories expanded); fails before any work on a missing path."""
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"input not found: {', '.join(missing)}")
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files.extend(
                f for f in sorted(p.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no input files under: {', '.join(map(str, inputs))}")
    return files


def _checked_text(text, where: str, skips: SkipCounter) -> str | None:
    if text is None:
        skips.skip("missing_field", where)
        return None
    if not isinstance(text, str):
        skips.skip("field_not_string", where)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        skips.skip("invalid_utf8", where)
        return None
    if not text.strip():
        skips.skip("empty_document", where)
        return None
    return text


def _decode(raw: bytes, where: str, skips: SkipCounter) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        skips.skip("invalid_utf8", where)
        return None
    return _checked_text(text, where, skips)


def _read_text(path: Path, text_mode: str, skips: SkipCounter) -> Iterator[str]:
    raw = path.read_bytes()
    if text_mode == "file":
        blocks = [raw]
    else:
        # Split on bytes, so that one bad block is skipped and the rest of the file still counts.
        blocks = _BLANK_LINES.split(raw)
    for i, block in enumerate(blocks):
        where = str(path) if text_mode == "file" else f"{path} block {i + 1}"
        text = _decode(block, where, skips)
        if text is not None:
            yield text


def iter_json_objects(path: Path, skips: SkipCounter) -> Iterator[tuple[str, dict]]:
    """(location "file:line", object) for every line of a JSONL file that parses to a JSON object."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                continue  # blank separator lines are not documents and not errors
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skips.skip("invalid_utf8", where)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.skip("invalid_json", where)
                continue
            if not isinstance(obj, dict):
                skips.skip("not_an_object", where)
                continue
            yield where, obj


def _read_jsonl(path: Path, text_field: str, skips: SkipCounter) -> Iterator[str]:
    for where, obj in iter_json_objects(path, skips):
        text = _checked_text(obj.get(text_field), where, skips)
        if text is not None:
            yield text


def _read_parquet(path: Path, text_field: str, skips: SkipCounter) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # optional dependency: only Parquet input needs it
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'minicpm-jax[parquet]'") from e
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputFileError(f"{path} is not a readable Parquet file: {err}") from err
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise MissingColumnError(f"{path} has no column {text_field!r} (columns: {columns}); pass --text-field")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _checked_text(value, f"{path} row {row}", skips)
            if text is not None:
                yield text


def iter_documents(
        path: Path, *, text_field: str = "text", text_mode: str = "file", skips: SkipCounter
) -> Iterator[str]:
    """Yields the good documents of one file; bad ones go to `skips`."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field, skips)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, skips)
    return _read_text(path, text_mode, skips)
