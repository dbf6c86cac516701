"""The one JSON writer: every JSON file the package leaves (manifests, sweep markers, reports, HF configs).

A leaf module (standard library only), so that every package, data/ included, may use it.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2, **dump_kwargs: Any) -> None:
    """Writes `value` as JSON (UTF-8, ending in a newline) to `path`, creating its folder.

    Atomic: written to `path`.tmp, then renamed over `path`, so a crash never leaves a half-written file
    that looks valid; a reader sees the old file or the new one. `dump_kwargs` go to json.dumps
    (sort_keys, ensure_ascii, default).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=indent, **dump_kwargs) + "\n")
    os.replace(tmp, path)
