"""The MiniCPM decoder (docs/recipe.md §1.1): x₀ = E[ids]·scale_emb; pre-norm blocks whose branch outputs are
scaled by α = scale_depth/√L; a final RMSNorm; logits = (h / (d/dim_model_base)) · headᵀ in float32.

The L blocks are stacked on one leading `layers` axis and run with `jax.lax.scan`, so compile time
does not grow with depth, and each block is rematerialised according to a named policy.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config import ModelConfig
from minicpm_jax.model.kv_cache import LayerKV, LayerSlot, cache_positions, cache_segments
from minicpm_jax.model.layers import MLP, Attention, RMSNorm, compute_weight, normal_param
from minicpm_jax.model.moe import MoE
from minicpm_jax.parallel.mesh import constrain

# The residual stream's logical axes at block boundaries (batch over data-parallel axes, length over sequence).
RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")

# What each remat policy keeps from the forward pass; everything else is recomputed in the backward.
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.residual_scale = cfg.residual_scale
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.is_moe = cfg.is_moe
        self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: LayerSlot | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array], LayerSlot | None]:
        """x [B, T, d] -> (x, router statistics: empty for a dense block, the updated KV cache or None).

        segment_ids as for Attention: the documents of x, or with a KV cache (decoding) its slots; the new
        keys and values are then written into the cache.
        """
        attn = self.self_attn(self.input_layernorm(x), positions, segment_ids, cache, cache_index)
        if cache is not None:
            attn, cache = attn
        # α scales only the branch output, never the residual stream itself.
        x = x + self.residual_scale * attn
        normed = self.post_attention_layernorm(x)
        mlp_out, aux = self.mlp(normed) if self.is_moe else (self.mlp(normed), {})
        return x + self.residual_scale * mlp_out, aux, cache

    def attention_scores(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The block's attention logits on input x [B, T, d] (see Attention.scores)."""
        return self.self_attn.scores(self.input_layernorm(x), positions)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderBlock:
    """One DecoderBlock whose every parameter has a leading axis of size L (logical name `layers`)."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(block_rngs):
        return DecoderBlock(cfg, rngs=block_rngs)

    return make(rngs)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Per-document positions for packed rows: 0 at each change of segment id, then counting up."""
    length = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class MiniCPM(nnx.Module):
    """The dense MiniCPM causal LM. Parameter names mirror the HF checkpoint's (see `hf.py`)."""

    def __init__(self, cfg: ModelConfig | Any, *, rngs: nnx.Rngs):
        cfg = ModelConfig.from_config(cfg)
        self.config = cfg
        self.embed_tokens = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg,
                                         group="embedding")
        self.layers = _stacked_blocks(cfg, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg,
                                     group="head", fan_in=cfg.hidden_size))

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_aux: bool = False) -> Any:
        """tokens int32 [B, T] → logits float32 [B, T, vocab]; with return_aux, (logits, aux).

        segment_ids [B, T] mark the documents of a packed row (no attention across them; positions then
        restart in each document unless given explicitly). aux holds an MoE model's router statistics
        averaged over layers (see `model/moe.py`); it is empty for a dense model.
        """
        batch, length = tokens.shape
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(length), (batch, length)))
        x, aux = self._run_layers(self._embed(tokens), positions, segment_ids)
        logits = self._logits(x)
        return (logits, aux) if return_aux else logits

    def decode(self, tokens: jax.Array, cache: LayerKV, cache_index: jax.Array, starts: jax.Array, *,
               last_logits_only: bool = False) -> tuple[jax.Array, LayerKV]:
        """Incremental forward with a KV cache (see kv_cache.py): (logits [B, T, vocab], updated cache).

        tokens [B, T] are written at cache slots cache_index .. cache_index + T - 1 (the prompt at once in
        prefill, then T = 1 per step); row b's sequence starts at slot starts[b] (left padding before it).
        last_logits_only skips the head on all but the last position (a prefill needs no more).
        """
        length = tokens.shape[1]
        positions = cache_positions(starts, cache_index, length)
        slot_segments = cache_segments(starts, cache.slots)
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, layer):
            x, cache = carry
            layer_state, index = layer
            x, _, slot = nnx.merge(graphdef, layer_state)(x, positions, slot_segments, LayerSlot(cache, index),
                                                          cache_index)
            return (x, slot.stacked), None

        layer_indices = jnp.arange(self.config.num_layers)
        (x, cache), _ = jax.lax.scan(one_layer, (self._embed(tokens), cache), (stacked, layer_indices))
        return self._logits(x[:, -1:] if last_logits_only else x), cache

    def activations(self, tokens: jax.Array) -> dict[str, jax.Array]:
        """Every intermediate of a forward pass over unpacked rows tokens [B, T], for the coordinate check
        (science/coord_check.py): `embedding` [B, T, d], `residual` [L, B, T, d] (each block's output),
        `attention_logits` [L, B, heads, T, T] (before the causal mask) and `logits` [B, T, vocab].

        A probe, apart from the training forward (which it equals): it recomputes each block's q and k.
        """
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(x, layer_state):
            block = nnx.merge(graphdef, layer_state)
            scores = block.attention_scores(x, positions)
            x, _, _ = block(x, positions, None)
            return x, (x, scores)

        embedded = self._embed(tokens)
        x, (residual, scores) = jax.lax.scan(one_layer, embedded, stacked)
        return {"embedding": embedded, "residual": residual, "attention_logits": scores, "logits": self._logits(x)}

    def _embed(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        return jnp.take(compute_weight(self.embed_tokens, jnp.dtype(cfg.dtype)), tokens, axis=0) * cfg.scale_emb

    def _logits(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        h = self.norm(x) / self.config.logit_divisor
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h, compute_weight(self.embed_tokens, dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", h, compute_weight(self.lm_head, dtype), preferred_element_type=jnp.float32)

    def _run_layers(self, x: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array | None) -> tuple[jax.Array, dict[str, Any]]:
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, layer_state):
            carry = constrain(carry, RESIDUAL_AXES)
            x, aux, _ = nnx.merge(graphdef, layer_state)(carry, positions, segment_ids)
            return x, aux

        policy = self.config.remat_policy
        if policy != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT[policy], prevent_cse=False)
        x, per_layer_aux = jax.lax.scan(one_layer, x, stacked)
        return constrain(x, RESIDUAL_AXES), jax.tree.map(lambda a: jnp.mean(a, axis=0), per_layer_aux)


def count_params(cfg: ModelConfig | Any, *, include_embedding: bool = False, active: bool = False) -> int:
    """Parameter count from abstract shapes (nothing is allocated, so the 2.4B config costs nothing).

    The paper's N (docs/recipe.md §1.3) excludes the embedding and, when untied, the LM head: they scale with
    the vocabulary, not with the compute per token. `active` counts what one token uses in an MoE
    model: num_experts_per_tok of its num_experts experts.
    """
    cfg = ModelConfig.from_config(cfg)
    abstract = nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0)))
    sizes = {tuple(str(p) for p in path): math.prod(variable.get_value().shape)
             for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    vocab_tensors = {("embed_tokens",), ("lm_head",)}
    total = 0
    for path, size in sizes.items():
        if path in vocab_tensors and not include_embedding:
            continue
        if active and cfg.is_moe and path[:2] == ("layers", "mlp") and path[2] != "router":
            size = size * cfg.num_experts_per_tok // cfg.num_experts
        total += size
    return total
