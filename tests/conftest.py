"""Shared test fixtures: tiny model configs and random-weight transformers references."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest

# Before jax is imported, here and in every subprocess the tests start: one persistent compilation cache
# per test session, so the many restarted runs (kill -9, resume, multi-process) reuse each other's
# compiled steps instead of recompiling them for seconds each time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"minicpm-jax-tests-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from minicpm_jax.config import ModelConfig  # noqa: E402
from minicpm_jax.hf.rope import rope_to_hf


def tiny_config(**overrides) -> ModelConfig:
    """A 3-layer GQA model with the real μP scalars (scale_emb 12, scale_depth 1.4) and m = 4."""
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=256, scale_emb=12.0, scale_depth=1.4,
                  dim_model_base=16, rms_norm_eps=1e-5)
    values.update(overrides)
    return ModelConfig(**values)


def random_granite(cfg: ModelConfig, seed: int = 0):
    """transformers' GraniteForCausalLM, or GraniteMoeForCausalLM for an MoE `cfg` (float32, eager
    attention), with random weights matching `cfg`.

    Norm gains are randomised too, so a loader that drops or swaps them cannot pass.
    """
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM, GraniteMoeConfig, GraniteMoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope_to_hf(cfg, "granite")["rope_parameters"], tie_word_embeddings=cfg.tie_word_embeddings,
        embedding_multiplier=cfg.scale_emb, residual_multiplier=cfg.scale_depth / math.sqrt(cfg.num_layers),
        logits_scaling=cfg.hidden_size / cfg.dim_model_base, attention_multiplier=1 / math.sqrt(cfg.head_dim),
        initializer_range=cfg.init_std, attn_implementation="eager")
    if cfg.is_moe:
        config = GraniteMoeConfig(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                                  **common)
        model = GraniteMoeForCausalLM(config).eval()
    else:
        model = GraniteForCausalLM(GraniteConfig(**common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif cfg.is_moe:  # expert tensors are torch.empty until an init hook runs: set every weight
                param.normal_(0.0, cfg.init_std)
    return model


def torch_logits(torch_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch_model(torch.from_numpy(np.asarray(tokens, dtype=np.int64))).logits.float().numpy()


def relative_max_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 128, size=(2, 64), dtype=np.int32)
