"""MiniCPM (v1: dense and MoE) for transformers' remote code (`trust_remote_code=True`), written by minicpm-jax.

Written from MiniCPM's architecture (not a copy of OpenBMB's file), with the same module and tensor names, so the
weights of a `--arch minicpm` export (or of an OpenBMB upload) load as they are:
- embeddings times `scale_emb`; pre-norm layers whose attention and MLP outputs are scaled by
  `scale_depth / sqrt(num_hidden_layers)` before they join the residual; the final hidden state divided by
  `hidden_size / dim_model_base` before the (tied or untied) LM head;
- RMSNorm with its variance in float32; rotate-half RoPE computed in float32 (default, linear or dynamic NTK
  scaling); GQA; softmax attention in float32; SwiGLU MLPs, or top-k MoE layers whose gate weights are the
  softmax of the router logits renormalised over the chosen experts.
Eager attention only; generation keeps a KV cache (transformers' Cache objects, or the legacy tuples).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:
    from transformers.generation import GenerationMixin
except ImportError:  # transformers before 4.39: PreTrainedModel is a GenerationMixin already
    GenerationMixin = object

try:
    from transformers.cache_utils import Cache, DynamicCache
except ImportError:  # no Cache classes: legacy tuples only
    Cache = DynamicCache = None

from .configuration_minicpm import MiniCPMConfig


class MiniCPMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)


def _inverse_frequencies(config, seq_len):
    head_dim = config.hidden_size // config.num_attention_heads
    base = float(config.rope_theta)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    factor = float(scaling.get("factor", 1.0))
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
        base = base * ratio ** (head_dim / (head_dim - 2))
    elif kind not in ("default", "linear", "dynamic"):
        raise NotImplementedError(f"RoPE scaling {kind!r} is not implemented by this remote code")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq / factor if kind == "linear" else inv_freq


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x, cos, sin):
    # x [B, H, T, D]; cos/sin [B, T, D] in float32
    rotated = x.float() * cos[:, None] + _rotate_half(x.float()) * sin[:, None]
    return rotated.to(x.dtype)


class MiniCPMAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, mask, past):
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if past is not None:
            k, v = past.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class MiniCPMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MiniCPMExpert(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MiniCPMMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MiniCPMExpert(config) for _ in range(config.num_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate(flat).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weights[rows, slot, None])
        return out.reshape(x.shape)


class MiniCPMDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = MiniCPMAttention(config, layer_idx)
        self.mlp = MiniCPMMoE(config) if config.num_experts else MiniCPMMLP(config)
        self.input_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden, cos, sin, mask, past):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, past) * self.residual_scale
        return hidden + self.mlp(self.post_attention_layernorm(hidden)) * self.residual_scale


class MiniCPMPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMConfig
    base_model_prefix = "model"
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, MiniCPMRMSNorm):
            module.weight.data.fill_(1.0)


class MiniCPMModel(MiniCPMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MiniCPMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, return_dict=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        hidden = inputs_embeds * self.config.scale_emb
        batch, length, _ = hidden.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        legacy_cache = past_key_values is not None and not (Cache is not None and isinstance(past_key_values, Cache))
        if legacy_cache:
            past_key_values = DynamicCache.from_legacy_cache(past_key_values)
        elif past_key_values is None and use_cache and DynamicCache is not None:
            past_key_values = DynamicCache()
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past_length + length
        if position_ids is None:
            position_ids = torch.arange(past_length, total, device=hidden.device)[None].expand(batch, -1)
        inv_freq = _inverse_frequencies(self.config, int(position_ids.max()) + 1).to(hidden.device)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        # Additive mask [B, 1, T, total]: causal, and padding where attention_mask is 0.
        query_pos = torch.arange(past_length, total, device=hidden.device)[:, None]
        allowed = torch.arange(total, device=hidden.device)[None, :] <= query_pos
        allowed = allowed[None, None].expand(batch, 1, length, total)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -total:].bool()
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, past_key_values)
        hidden = self.norm(hidden)
        cache = past_key_values if use_cache else None
        if legacy_cache and cache is not None:
            cache = cache.to_legacy_cache()
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, GenerationMixin):
    # transformers 5 reads the mapping; 4.x iterates over it, which gives the tied key.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = outputs.last_hidden_state / (self.config.hidden_size / self.config.dim_model_base)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        if past_key_values is not None:
            if Cache is not None and isinstance(past_key_values, Cache):
                past_length = past_key_values.get_seq_length()
            else:
                past_length = past_key_values[0][0].shape[2]
            input_ids = input_ids[:, past_length:]
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "position_ids": position_ids, "use_cache": kwargs.get("use_cache", True)}
