"""Config loading, overrides, validation errors and the exact parameter counts of docs/recipe.md §1.3."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from minicpm_jax import config, optim
from minicpm_jax.config import ConfigError
from minicpm_jax.model import count_params

SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.py"))


@pytest.mark.parametrize("path, non_embedding, total", [
    ("configs/minicpm_1b.py", 1_247_442_432, 1_360_246_272),
    ("configs/minicpm_2b.py", 2_442_057_984, 2_724_880_896),
])
def test_exact_parameter_counts(path, non_embedding, total):
    cfg = config.load(path)
    assert count_params(cfg.model) == non_embedding
    assert count_params(cfg.model, include_embedding=True) == total


def test_demo_config_is_small_and_derived_constants_follow_the_formulas():
    cfg = config.ModelConfig.from_config(config.load("configs/demo.py").model)
    assert count_params(cfg, include_embedding=True) < 5_000_000
    two_b = config.ModelConfig.from_config(config.load("configs/minicpm_2b.py").model)
    assert two_b.residual_scale == pytest.approx(0.221359, abs=1e-6)
    assert two_b.logit_divisor == 9.0 and two_b.head_dim == 64
    one_b = config.ModelConfig.from_config(config.load("configs/minicpm_1b.py").model)
    assert one_b.residual_scale == pytest.approx(0.194145, abs=1e-6) and one_b.logit_divisor == 6.0


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda path: path.stem)
def test_train_steps_alone_rescales_every_shipped_schedule(path):
    cfg = config.load(path, ["train.steps=50"])
    warmup, stable, decay = optim.resolve_phases(cfg.schedule, 50)
    # Phases are fractions of the run: a WSD schedule still ends at train.steps, a cosine's warmup stays inside it.
    assert warmup + stable + decay == 50 if cfg.schedule.name == "wsd" else warmup < 50


def test_overrides_in_both_spellings():
    cfg = config.load("configs/demo.py", ["model.num_layers=2", "--config.model.rope_theta=5e5",
                                          "model.dtype=bfloat16", "model.scale_emb=10"])
    assert cfg.model.num_layers == 2 and cfg.model.rope_theta == 5e5
    assert cfg.model.dtype == "bfloat16" and cfg.model.scale_emb == 10.0


@pytest.mark.parametrize("override, message", [
    ("model.num_heads=5", "model.num_heads=5 must divide model.hidden_size=256"),
    ("model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_heads=4"),
    ("model.hidden_size=-256", "model.hidden_size=-256 must be a positive integer"),
    ("model.dtype='float8'", "model.dtype='float8' must be one of"),
    ("model.remat_policy='some'", "model.remat_policy='some' must be one of"),
    ("model.num_layer=3", "unknown config key model.num_layer; did you mean num_layers"),
    ("model.hidden_size='wide'", "config key model.hidden_size: cannot set 'wide'"),
    ("model.num_layers", "has no value: write model.num_layers=VALUE"),
    ("train.eval_batch_size=-1", "train.eval_batch_size=-1 must be an integer >= 0"),
    ("train.update_stats_probe_batches=0", "train.update_stats_probe_batches=0 must be a positive integer"),
])
def test_bad_configs_fail_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load("configs/demo.py", [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: configs/nope.py"):
        config.load("configs/nope.py")


def test_base_config_is_every_typed_section_with_its_defaults():
    base = config.load("configs/base.py")
    assert set(base) == set(config.RUN_SECTIONS)
    for name in config.RUN_SECTIONS:
        cls = config.SECTIONS[name]
        assert set(base[name]) == {field.name for field in dataclasses.fields(cls)}, name  # no knob is untyped
        typed = (config.DataConfig.from_config(base.data, check_paths=False) if name == "data"
                 else config.typed_section(cls, base[name], name))
        assert typed == cls(), f"configs/base.py's {name} section differs from config.{cls.__name__}'s defaults"


def test_every_section_is_checked_when_a_config_loads():
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=0 must be a positive integer"):
        config.load("configs/demo.py", ["checkpoint.keep_last=0"])
    with pytest.raises(ConfigError, match=r"optim\.b1=1\.5 must be a number in \[0, 1\)"):
        config.load("configs/demo.py", ["optim.b1=1.5"])
    with pytest.raises(ConfigError, match=r"mesh\.rules='zero' must be one of \('dp', 'fsdp', 'fsdp_tp'\)"):
        config.load("configs/demo.py", ["mesh.rules='zero'"])
    with pytest.raises(ConfigError, match=r"data\.num_workers must be >= 0"):
        config.load("configs/demo.py", ["data.num_workers=-1"])
    cfg = config.load("configs/demo.py")
    cfg.schedul = cfg.schedule
    with pytest.raises(ConfigError, match="unknown config key schedul; did you mean schedule"):
        config.validate(cfg)
