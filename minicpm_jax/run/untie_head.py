"""Untying the LM head for long-context training (docs/recipe.md §9): MiniCPM-2.4B-128K starts from a stable
checkpoint of the tied 2.4B model, gives it a separate head initialised from the input embedding, and
trains on.

Our head is stored [embed, vocab] and the embedding [vocab, embed], so the new head is the embedding
transposed: logits are unchanged at the moment of untying. The optimizer state carries over for every
parameter that existed before; the new head's Adam moments start at zero (a fresh tensor), while the
step count stays the run's, so the schedule continues where the source was.
"""

from __future__ import annotations

from typing import Any

import jax


def untie_params(params: dict[str, Any], sharding: Any = None) -> dict[str, Any]:
    """Tied params (pure dict) -> untied: adds lm_head = embed_tokensᵀ, placed with `sharding` if given."""
    if "lm_head" in params:
        raise ValueError("the checkpoint already has an lm_head: its head is untied")
    head = params["embed_tokens"].T
    return {**params, "lm_head": head if sharding is None else jax.device_put(head, sharding)}


def carry_over_opt_state(source: Any, fresh: Any) -> Any:
    """`fresh` (tx.init of the untied params) with every leaf the source state also has taken from `source`.

    Leaves are matched by their path in the optimizer-state tree; only the new head's moments stay fresh.
    """
    by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    used = set()

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        if key not in by_path:
            return leaf
        if by_path[key].shape != leaf.shape:
            raise ValueError(f"optimizer state {key}: source shape {by_path[key].shape} != {leaf.shape}")
        used.add(key)
        return by_path[key]

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    unused = sorted(set(by_path) - used)
    if unused:
        raise ValueError(f"optimizer state entries of the source have no place in the untied state: {unused[:5]}")
    return merged
