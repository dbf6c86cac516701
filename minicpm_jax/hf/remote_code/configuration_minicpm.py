"""MiniCPM's config for transformers' remote code (`trust_remote_code=True`), written by minicpm-jax's export-hf.

Written from MiniCPM's architecture (not a copy of OpenBMB's file); it reads the same config.json keys as
OpenBMB's `configuration_minicpm.py`, so the same folder works with either.
"""

from transformers import PretrainedConfig


class MiniCPMConfig(PretrainedConfig):
    model_type = "minicpm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=122753, hidden_size=2304, intermediate_size=5760, num_hidden_layers=40,
                 num_attention_heads=36, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096,
                 initializer_range=0.1, rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=None,
                 attention_dropout=0.0, scale_emb=1.0, dim_model_base=1, scale_depth=1.0, num_experts=0,
                 num_experts_per_tok=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_dropout = attention_dropout
        self.scale_emb = scale_emb
        self.dim_model_base = dim_model_base
        self.scale_depth = scale_depth
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
