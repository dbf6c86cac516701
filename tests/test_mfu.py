"""The MFU in training logs is the benchmarks' MFU: tokens/s × FLOPs/token (6·N + 12·L·T·d) / peak."""

from __future__ import annotations

import pytest

from minicpm_jax.config import ModelConfig
from minicpm_jax.train import loop as train_lib
from minicpm_jax.train import metrics

from train_helpers import read_metrics, tiny_run_config, write_token_folder

# The tiny run's model (d 64, d_ff 160, L 2, 2 query heads and 1 kv head of 32, V 128) at T = 32, by hand:
# N = L·(2·d·d + 2·d·32 + 3·d·d_ff) + V·d matmul weights, then 6·N + 12·L·T·d.
TINY_N = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160) + 128 * 64
TINY_FLOPS_PER_TOKEN = 6 * TINY_N + 12 * 2 * 32 * 64


@pytest.mark.slow
def test_logged_mfu_is_tokens_per_second_times_flops_per_token_over_the_configured_peak(tmp_path):
    corpus = write_token_folder(tmp_path / "corpus")
    cfg = tiny_run_config(corpus, train__steps=4, train__log_every_steps=2, checkpoint__every_steps=4,
                          schedule__warmup_steps=1, schedule__stable_steps=2, schedule__decay_steps=1,
                          train__peak_flops_per_device=2e9)
    train_lib.train(cfg, str(tmp_path / "run"))
    logged = [m for m in read_metrics(tmp_path / "run") if "mfu" in m]
    assert [m["step"] for m in logged] == [2, 4]
    assert metrics.train_flops_per_token(ModelConfig.from_config(cfg.model), 32) == TINY_FLOPS_PER_TOKEN
    for m in logged:
        assert m["tokens_per_sec"] > 0
        assert m["mfu"] == pytest.approx(m["tokens_per_sec"] * TINY_FLOPS_PER_TOKEN / 2e9, rel=1e-12)


def test_mfu_is_none_without_a_peak():
    assert metrics.mfu(1000.0, 1e6, 0.0) is None
    assert metrics.mfu(1000.0, 1e6, 4e9) == pytest.approx(0.25)
