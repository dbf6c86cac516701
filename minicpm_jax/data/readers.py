"""Reads documents from plain text, JSONL or Parquet files, counting bad input instead of crashing.

Formats, chosen by file extension:
  *.jsonl    one JSON object per line; the document is the string in `text_field`.
  *.parquet  one document per row, column `text_field` (needs `pip install pyarrow`).
  other      plain UTF-8 text: `text_mode="file"` makes the whole file one document,
             `text_mode="paragraphs"` makes each blank-line-separated block one document.
A directory given as input stands for every non-hidden file below it, in sorted order.

`iter_texts` yields `Document`s. Plain text is read in blocks of READ_BLOCK_BYTES, so a document longer than
that (a 200 MB single-line file) is never held whole: its `Document` hands out the text piece by piece, and
the tokenizer encodes it chunk by chunk (`Tokenizer.encode_stream`).

Bad input never passes as data and never stops the job: each skip is counted under one of
SKIP_REASONS and the first few are logged with file and line.
"""

from __future__ import annotations

import codecs
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
_LINE_SPACE = b" \t\r\n"  # the bytes a blank-line separator is made of
READ_BLOCK_BYTES = 1 << 20  # plain text is read this much at a time; a longer document is streamed

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


class Document:
    """One good document (bad ones are counted in the SkipCounter, never yielded), whole or streamed.

    `text` is the whole text, or None for a long plain-text document, which is read as it is iterated:
    iterating any Document yields its text in pieces. A streamed document is checked as it is read; when it turns
    out bad (invalid UTF-8, nothing but whitespace) the pieces stop early, `ok` becomes False and the skip is
    counted, so a consumer checks `ok` after the last piece. Iterate a document before asking for the next one.
    """

    def __init__(self, where: str, text: str | None = None, pieces: Iterator[str] | None = None):
        self.where, self.text, self._pieces, self.ok = where, text, pieces, True

    def __iter__(self) -> Iterator[str]:
        if self.text is not None:
            step = READ_BLOCK_BYTES
            yield from (self.text[i:i + step] for i in range(0, len(self.text), step)) if self.text else [""]
        elif self._pieces is not None:
            pieces, self._pieces = self._pieces, None
            yield from pieces


def _byte_blocks(f, split: bool, read_bytes: int) -> Iterator[bytes | None]:
    """The bytes of a file in pieces, with None after each blank-line-separated block (after the whole file when
    not `split`). The blocks are exactly those of `_BLANK_LINES.split(whole_file)`: a piece is split up to its
    last byte that cannot belong to a separator, and a separator never reaches past such a byte."""
    carry = b""
    while data := f.read(read_bytes):
        if not split:
            yield data
            continue
        data = carry + data
        end = len(data.rstrip(_LINE_SPACE))  # just after the last content byte
        done, carry = data[:end], data[end:]
        parts = _BLANK_LINES.split(done)
        for i, part in enumerate(parts):
            if i:
                yield None
            if part:
                yield part
    if carry:  # nothing but separator bytes since the last content byte
        for i, part in enumerate(_BLANK_LINES.split(carry)):
            if i:
                yield None
            if part:
                yield part
    yield None


def _read_text(path: Path, text_mode: str, skips: SkipCounter) -> Iterator[Document]:
    # Split on bytes, so that one bad block is skipped and the rest of the file still counts.
    read_bytes = READ_BLOCK_BYTES
    with open(path, "rb") as f:
        blocks = _byte_blocks(f, text_mode == "paragraphs", read_bytes)
        number = 0
        while True:
            number += 1
            where = str(path) if text_mode == "file" else f"{path} block {number}"
            parts, size = [], 0
            for part in blocks:
                if part is None:
                    break
                parts.append(part)
                size += len(part)
                if size > read_bytes:
                    break
            else:
                return  # the None after the last block has been read
            if part is None:  # the whole block is read: check it as before
                text = _decode(b"".join(parts), where, skips)
                if text is not None:
                    yield Document(where, text)
                continue
            doc = Document(where)
            doc._pieces = _streamed_text(doc, parts, blocks, skips)
            yield doc
            for _ in doc:  # a consumer that stopped early: read on to the end of the block
                pass


def _streamed_text(doc: Document, parts: list[bytes], blocks: Iterator[bytes | None],
                   skips: SkipCounter) -> Iterator[str]:
    """The text of one long block, decoded as it is read; marks `doc` bad (and counts it) if it turns out bad."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True

    def pieces():
        yield from parts
        parts.clear()
        for part in blocks:
            if part is None:
                return
            yield part

    raw = pieces()
    try:
        for part in raw:
            text = decoder.decode(part)
            blank = blank and (not text or text.isspace())
            if text:
                yield text
        text = decoder.decode(b"", final=True)
        blank = blank and (not text or text.isspace())
        if text:
            yield text
    except UnicodeDecodeError:
        doc.ok = False
        skips.skip("invalid_utf8", doc.where)
        for _ in raw:  # the rest of the block
            pass
        return
    if blank:
        doc.ok = False
        skips.skip("empty_document", doc.where)


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
            del raw  # a long line is held once as text, not also as bytes and as the parsed object
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skips.skip("invalid_json", where)
                continue
            finally:
                del line
            if not isinstance(obj, dict):
                skips.skip("not_an_object", where)
                continue
            yield where, obj


def _read_jsonl(path: Path, text_field: str, skips: SkipCounter) -> Iterator[Document]:
    for where, obj in iter_json_objects(path, skips):
        text = _checked_text(obj.pop(text_field, None), where, skips)
        del obj
        if text is not None:
            yield Document(where, text)


def _read_parquet(path: Path, text_field: str, skips: SkipCounter) -> Iterator[Document]:
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
            where = f"{path} row {row}"
            text = _checked_text(value, where, skips)
            if text is not None:
                yield Document(where, text)


def iter_documents(
        path: Path, *, text_field: str = "text", text_mode: str = "file", skips: SkipCounter
) -> Iterator[str]:
    """Yields the text of each good document of one file (whole); bad ones go to `skips`."""
    for doc in iter_texts(path, text_field=text_field, text_mode=text_mode, skips=skips):
        text = doc.text if doc.text is not None else "".join(doc)
        if doc.ok:
            yield text


def iter_texts(
        path: Path, *, text_field: str = "text", text_mode: str = "file", skips: SkipCounter
) -> Iterator[Document]:
    """Yields the good documents of one file, a long plain-text one streamed; bad ones go to `skips`."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, text_field, skips)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, skips)
    return _read_text(path, text_mode, skips)
