"""The MiniCPM decoder (facts §1.2): x₀ = E[ids]·scale_emb; pre-norm blocks whose branch outputs are
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
from minicpm_jax.model.layers import MLP, Attention, RMSNorm, normal_param
from minicpm_jax.sharding import constrain

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
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        # α scales only the branch output, never the residual stream itself.
        x = x + self.residual_scale * self.self_attn(self.input_layernorm(x), positions, segment_ids)
        return x + self.residual_scale * self.mlp(self.post_attention_layernorm(x))


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
                        normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg))

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B, T] → logits float32 [B, T, vocab].

        segment_ids [B, T] mark the documents of a packed row (no attention across them; positions then
        restart in each document unless given explicitly).
        """
        cfg = self.config
        batch, length = tokens.shape
        if positions is None:
            positions = (positions_from_segments(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(length), (batch, length)))

        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dtype) * cfg.scale_emb
        x = self._run_layers(x, positions, segment_ids)
        h = self.norm(x) / cfg.logit_divisor
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h, self.embed_tokens[...].astype(dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", h, self.lm_head[...].astype(dtype), preferred_element_type=jnp.float32)

    def _run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        graphdef, stacked = nnx.split(self.layers)

        def one_layer(carry, layer_state):
            carry = constrain(carry, RESIDUAL_AXES)
            return nnx.merge(graphdef, layer_state)(carry, positions, segment_ids), None

        policy = self.config.remat_policy
        if policy != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT[policy], prevent_cse=False)
        x, _ = jax.lax.scan(one_layer, x, stacked)
        return constrain(x, RESIDUAL_AXES)


def count_params(cfg: ModelConfig | Any, *, include_embedding: bool = False) -> int:
    """Parameter count from abstract shapes (nothing is allocated, so the 2.4B config costs nothing).

    The paper's N (facts §1.1) excludes the embedding and, when untied, the LM head: they scale with
    the vocabulary, not with the compute per token.
    """
    abstract = nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0)))
    sizes = {path: math.prod(variable.get_value().shape)
             for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    vocab_tensors = {("embed_tokens",), ("lm_head",)}
    return sum(size for path, size in sizes.items() if include_embedding or tuple(path) not in vocab_tensors)
