"""Long/short split of a prepared folder by document length (docs/recipe.md §9: MiniCPM-2.4B-128K trains on 44%
"long" and 56% "short" data).

    minicpm-jax split-by-length --input data/books/train --threshold 4096 --out data/books_by_length
    --config.data.mixtures.stable=data/books_by_length/long:0.44,data/web_by_length/short:0.56

Documents with more than `threshold` tokens (BOS and EOS included) go to OUT/long, the rest to OUT/short;
both are ordinary prepared folders, so the mixture weights (token fractions) set the long/short ratio.
The source keeps no per-document byte counts, so both parts inherit its bytes_per_token.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from minicpm_jax import storage
from minicpm_jax.data import records

log = logging.getLogger(__name__)

PARTS = ("long", "short")


def split_by_length(prepared_dir: str | os.PathLike, threshold: int, out_dir: str | os.PathLike,
                    num_shards: int = 1) -> dict[str, dict[str, Any]]:
    """Writes OUT/long and OUT/short; returns their manifests."""
    if threshold < 1:
        raise ValueError(f"--threshold must be >= 1 token, got {threshold}")
    manifest, shards = records.open_shards(prepared_dir)
    part_dirs = {part: storage.join(out_dir, part) for part in PARTS}
    for part_dir in part_dirs.values():
        if storage.exists(storage.join(part_dir, records.MANIFEST_NAME)):
            raise FileExistsError(f"{part_dir} already holds a prepared dataset; choose another --out")
    writers = {part: records.ShardWriter(part_dirs[part], num_shards) for part in PARTS}
    for shard in shards:
        for index in range(len(shard)):
            doc = shard[index]
            writers["long" if len(doc) > threshold else "short"].write(doc)
    manifests = {}
    for part, writer in writers.items():
        shard_counts = writer.close()
        documents = sum(s["num_documents"] for s in shard_counts)
        tokens = sum(s["num_tokens"] for s in shard_counts)
        if documents == 0:
            log.warning("%s: no document is %s than the threshold of %d tokens", part_dirs[part],
                        "longer" if part == "long" else "at most as long", threshold)
        manifests[part] = records.write_manifest(part_dirs[part], {
            **{k: v for k, v in manifest.items() if k not in ("format_version", "shards")},
            "num_documents": documents, "num_tokens": tokens,
            "mean_document_tokens": tokens / documents if documents else None, "shards": shard_counts,
            "length_split": {"source": storage.absolute(prepared_dir), "threshold": threshold, "part": part},
        })
        log.info("wrote %s: %d documents, %d tokens", part_dirs[part], documents, tokens)
    return manifests
