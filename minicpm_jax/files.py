"""The one JSON writer: every JSON file the package leaves (manifests, sweep markers, reports, HF configs).

A leaf of the package (it uses only storage.py), so that every package, data/ included, may use it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from minicpm_jax import storage


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, **dump_kwargs: Any) -> None:
    """Writes `value` as JSON (UTF-8, ending in a newline) to `path`, a local path or a gs:// or s3:// URL.

    Atomic (storage.write_text): a crash never leaves a half-written file that looks valid; a reader sees
    the old file or the new one. `dump_kwargs` go to json.dumps (sort_keys, ensure_ascii, default).
    """
    storage.write_text(path, json.dumps(value, indent=indent, **dump_kwargs) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in `path`; a ValueError naming the path when it does not parse."""
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
