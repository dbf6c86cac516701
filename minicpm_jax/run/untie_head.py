"""Untying the LM head for long-context training (docs/recipe.md §9): MiniCPM-2.4B-128K starts from a stable
checkpoint of the tied 2.4B model, gives it a separate head initialised from the input embedding, and
trains on.

Our head is stored [embed, vocab] and the embedding [vocab, embed], so the new head is the embedding
transposed: logits are unchanged at the moment of untying. The head's effective learning rate is continuous
too: the μP table treats the `head` group exactly like the `embedding` (lr multiplier and weight decay,
model/parametrization.py), and the head's optimizer state (Adam's moments, any per-tensor statistics) starts
as the embedding's, transposed. Its first update after the untie is therefore the one the tied tensor would
have made for the same gradient. Every other leaf carries over, the step count included, so the schedule
continues where the source was.
"""

from __future__ import annotations

from typing import Any

import jax

HEAD_KEY, EMBEDDING_KEY = "['lm_head']", "['embed_tokens']"


def untie_params(params: dict[str, Any], sharding: Any = None) -> dict[str, Any]:
    """Tied params (pure dict) -> untied: adds lm_head = embed_tokensᵀ, placed with `sharding` if given."""
    if "lm_head" in params:
        raise ValueError("the checkpoint already has an lm_head: its head is untied")
    head = params["embed_tokens"].T
    return {**params, "lm_head": head if sharding is None else jax.device_put(head, sharding)}


def carry_over_opt_state(source: Any, fresh: Any) -> Any:
    """`fresh` (tx.init of the untied params) with every leaf taken from the tied `source` state.

    Leaves are matched by their path in the optimizer-state tree; a leaf of the new head takes the embedding's
    leaf at the same place, transposed. A fresh leaf with no counterpart in the source keeps its init.
    """
    by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    used = set()

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        embedding_key = key.replace(HEAD_KEY, EMBEDDING_KEY)
        if key not in by_path and HEAD_KEY in key and embedding_key in by_path:
            moved = by_path[embedding_key].T
            if moved.shape != leaf.shape:
                raise ValueError(f"optimizer state {embedding_key}: its transpose {moved.shape} is not the "
                                 f"head's shape {leaf.shape}")
            return jax.device_put(moved, leaf.sharding) if isinstance(leaf, jax.Array) else moved
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
