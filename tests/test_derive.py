"""Derived runs (branch, untie-head, upcycle, SFT/DPO starts, training an imported model) follow one rule:
the model's shape and μP scalars are the source's, its compute settings are the user's config's."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpm_jax import cli
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.run import checkpoint
from minicpm_jax.run.branch import create_branch
from minicpm_jax.run.plan import plan_run
from minicpm_jax.run.upcycle import create_upcycled_run

from align_helpers import make_source_run
from data_helpers import train_small_tokenizer
from train_helpers import DEMO_CONFIG, REPO, tiny_run_config, tiny_run_overrides, train_run, write_token_folder

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "tokens", num_docs=60)


@pytest.fixture(scope="module")
def stable_run(corpus, tmp_path_factory) -> Path:
    """A tiny dense run trained to step 8 in its stable phase (float32, save_dots_no_batch remat)."""
    workdir = tmp_path_factory.mktemp("stable") / "run"
    train_run(tiny_run_config(corpus, train__steps=8, schedule__warmup_steps=2, schedule__stable_steps=6,
                              schedule__decay_steps=0, checkpoint__keep_every_steps=4), workdir)
    return workdir


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    return str(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def _checkpoint_model(workdir: Path, step: int) -> dict:
    """The model section of the resolved config that checkpoint `step` of a run records."""
    saved = checkpoint.RunCheckpoints(str(workdir), async_save=False)
    try:
        return saved.restore_meta(step).config["model"]
    finally:
        saved.close()


def _run_model(workdir: Path) -> ModelConfig:
    """The model a run trains: its config.json as the run plan reads it."""
    return plan_run(checkpoint.read_run_config(str(workdir))).model


def test_compute_field_names_are_model_fields():
    assert ModelConfig.COMPUTE_FIELDS <= set(ModelConfig.__dataclass_fields__)
    assert ModelConfig.CONTEXT_FIELDS <= set(ModelConfig.__dataclass_fields__)


def test_branch_takes_a_compute_override(stable_run, tmp_path):
    branch_cfg = create_branch(str(stable_run), 8, str(tmp_path / "branch"), decay_steps=2,
                               overrides=["model.remat_policy=full", "model.attention_impl=chunked"])
    assert (branch_cfg.model.remat_policy, branch_cfg.model.attention_impl) == ("full", "chunked")
    assert _checkpoint_model(tmp_path / "branch", 8)["remat_policy"] == "full"
    assert _run_model(tmp_path / "branch").attention_impl == "chunked"


def test_untied_branch_takes_a_compute_override_and_a_longer_context(stable_run, tmp_path):
    # The long-context recipe: untie the head and change RoPE on the same weights (configs/minicpm_2b_128k.py).
    create_branch(str(stable_run), 8, str(tmp_path / "untied"), decay_steps=2, untie_head=True,
                  overrides=["model.dtype=bfloat16", "model.rope_theta=1e6"])
    model = _run_model(tmp_path / "untied")
    assert (model.dtype, model.rope_theta, model.tie_word_embeddings) == ("bfloat16", 1e6, False)
    assert _checkpoint_model(tmp_path / "untied", 8)["dtype"] == "bfloat16"


def test_upcycled_run_takes_a_compute_override(stable_run, corpus, tmp_path):
    cfg = tiny_run_config(corpus, model__num_experts=4, model__moe_dispatch="dense", model__remat_policy="full")
    create_upcycled_run(str(stable_run), 8, str(tmp_path / "moe"), cfg)
    model = _run_model(tmp_path / "moe")
    assert (model.num_experts, model.moe_dispatch, model.remat_policy) == (4, "dense", "full")


def test_imported_model_trains_with_the_configs_compute_settings(corpus, tmp_path):
    run = make_source_run(tmp_path / "imported", remat_policy="none")  # compute settings unlike the config's
    source = checkpoint.read_run_config(str(run)).model
    assert (source.dtype, source.remat_policy) == ("float32", "none")
    training = [item for item in tiny_run_overrides(corpus, train__steps=2, schedule__warmup_steps=1,
                                                    schedule__stable_steps=1, schedule__decay_steps=0,
                                                    checkpoint__every_steps=2)
                if not item.startswith("model.")]
    assert cli.main(["train", "--workdir", str(run), "--config", str(DEMO_CONFIG), "--config.model.dtype=bfloat16",
                     *[f"--config.{item}" for item in training]]) == 0
    trained = _checkpoint_model(run, 2)
    # dtype from the override, remat_policy from configs/demo.py, the shape and μP scalars from the import.
    assert (trained["dtype"], trained["remat_policy"]) == ("bfloat16", "save_dots_no_batch")
    assert (trained["vocab_size"], trained["max_position_embeddings"]) == (source.vocab_size,
                                                                           source.max_position_embeddings)
    assert _run_model(run).dtype == "bfloat16"


@pytest.mark.parametrize("command, data", [("sft", "sft_example.jsonl"), ("dpo", "dpo_example.jsonl")])
def test_finetune_start_takes_a_compute_override(command, data, tmp_path, tok_path):
    source = make_source_run(tmp_path / "source", remat_policy="none")
    assert cli.main([command, "--from", str(source), "--workdir", str(tmp_path / command), "--data",
                     str(EXAMPLES / data), "--tokenizer", tok_path, "--no-train",
                     "--config.model.dtype=bfloat16"]) == 0
    model = _run_model(tmp_path / command)
    assert (model.dtype, model.remat_policy) == ("bfloat16", "save_dots_no_batch")  # override; the config file's
    assert model.hidden_size == checkpoint.read_run_config(str(source)).model.hidden_size


def test_a_shape_override_of_a_branch_is_refused_naming_the_key(stable_run, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_layers \(source 2, config 3\)"):
        create_branch(str(stable_run), 8, str(tmp_path / "deeper"), decay_steps=2, overrides=["model.num_layers=3"])
    assert not (tmp_path / "deeper").exists()


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_shape_override_of_an_imported_model_is_refused_naming_the_key(command, tmp_path, tok_path, capsys):
    source = make_source_run(tmp_path / "imported")
    args = (["train", "--workdir", str(source), "--config", str(DEMO_CONFIG)] if command == "train" else
            ["sft", "--from", str(source), "--workdir", str(tmp_path / "sft"), "--data",
             str(EXAMPLES / "sft_example.jsonl"), "--tokenizer", tok_path, "--no-train"])
    assert cli.main([*args, "--config.model.num_layers=3"]) == 2
    assert "model.num_layers (source 2, config 3)" in capsys.readouterr().err


def _crashing_once(real):
    """`real` (write_run_config), except that its first call dies as a kill would, after the checkpoint save."""
    calls = []

    def write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed between the checkpoint save and config.json")
        return real(*args, **kwargs)

    return write


@pytest.mark.parametrize("kind", ["branch", "upcycle", "import-hf"])
def test_a_creation_interrupted_before_its_config_is_redone_by_running_it_again(
        kind, stable_run, corpus, tmp_path, monkeypatch, caplog):
    from minicpm_jax.hf import runs as hf_runs
    from minicpm_jax.run import branch, upcycle

    workdir = tmp_path / kind
    if kind == "import-hf":
        hf_runs.save_hf(checkpoint.restore_model(str(stable_run))[0], None, tmp_path / "hf", arch="granite")
        module, create = hf_runs.checkpoint, lambda: hf_runs.import_run(str(tmp_path / "hf"), str(workdir))
    elif kind == "branch":
        module, create = branch, lambda: create_branch(str(stable_run), 4, str(workdir), decay_steps=2)
    else:
        cfg = tiny_run_config(corpus, model__num_experts=4, model__moe_dispatch="dense")
        module, create = upcycle, lambda: create_upcycled_run(str(stable_run), 8, str(workdir), cfg)
    monkeypatch.setattr(module, "write_run_config", _crashing_once(module.write_run_config))
    with pytest.raises(KeyboardInterrupt):
        create()
    assert (workdir / "checkpoints").is_dir() and not checkpoint.is_run(str(workdir))
    create()  # what a user does after the crash: the same command again
    assert "an earlier creation of this run was interrupted" in caplog.text
    assert checkpoint.is_run(str(workdir))
    saved = checkpoint.RunCheckpoints(str(workdir), async_save=False)
    assert len(saved.all_steps()) == 1
    saved.close()
    checkpoint.restore_model(str(workdir))  # and the weights it saved verify
