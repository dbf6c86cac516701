"""The train loop: exact resume after kill -9, branching, checkpoint safety, config errors, the demo config."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minicpm_jax import cli, optim
from minicpm_jax.config import ConfigError
from minicpm_jax.run import checkpoint
from minicpm_jax.run.branch import create_branch
from minicpm_jax.train import loop as train_lib

from train_helpers import (
    REPO,
    assert_same_run,
    losses_by_step,
    read_metrics,
    tiny_run_config,
    train_run,
    write_token_folder,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_token_folder(root / "low", low=3, high=64, seed=0)
    write_token_folder(root / "high", low=64, high=128, seed=1)
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minicpm_jax.cli", *args]


def _cli_config_args() -> list[str]:
    flat = {"model.vocab_size": 128, "model.hidden_size": 64, "model.intermediate_size": 160, "model.num_layers": 2,
            "model.num_heads": 2, "model.num_kv_heads": 1, "model.dim_model_base": 32, "data.val_dir": "''",
            "data.tokenizer": "''", "train.eval_every_steps": 0, "checkpoint.keep_every_steps": 0}
    return [f"--config.{k}={v}" for k, v in flat.items()]


@pytest.mark.slow
def test_soak_ten_random_kill9s_during_async_saves_give_the_uninterrupted_run_bitwise(corpus, tmp_path):
    steps, kills = 300, 10
    common = ["--config", str(REPO / "configs/demo.py"), *_cli_config_args(),
              "--config.train.global_batch_size=4", "--config.train.seq_len=32", f"--config.train.steps={steps}",
              "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=5",
              "--config.checkpoint.async_save=True",
              "--config.schedule.warmup_steps=10", "--config.schedule.stable_steps=240",
              "--config.schedule.decay_steps=50",
              f"--config.data.mixtures.stable={corpus / 'low'}:0.5,{corpus / 'high'}:0.5"]
    subprocess.run(_cli("train", "--workdir", str(tmp_path / "straight"), *common), check=True, capture_output=True)

    killed = tmp_path / "killed"
    rng = np.random.default_rng(0)
    # Each kill lands a random few steps into a restarted process, at a random moment within a step: during
    # an asynchronous save, a commit, a restore or plain training.
    for kill in range(kills):
        process = subprocess.Popen(_cli("train", "--workdir", str(killed), *(common if kill == 0 else [])),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed_from = max(losses_by_step(killed), default=0) if (killed / "metrics.jsonl").exists() else 0
        target = resumed_from + int(rng.integers(3, 20))
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if (killed / "metrics.jsonl").exists() and max(losses_by_step(killed), default=0) >= target:
                time.sleep(float(rng.uniform(0, 0.05)))
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, f"kill {kill + 1}: the run ended before it was killed"
    assert max(losses_by_step(killed)) < steps

    subprocess.run(_cli("train", "--workdir", str(killed)), check=True, capture_output=True)
    assert_same_run(killed, tmp_path / "straight", steps)  # and no step lost


def test_sigterm_saves_and_exits_cleanly_then_resumes(corpus, tmp_path):
    workdir = tmp_path / "run"
    args = ["--config", str(REPO / "configs/demo.py"), *_cli_config_args(), "--config.train.global_batch_size=4",
            "--config.train.seq_len=32", "--config.train.steps=100000", "--config.checkpoint.every_steps=1000",
            f"--config.data.mixtures.stable={corpus / 'low'}:1"]
    process = subprocess.Popen(_cli("train", "--workdir", str(workdir), *args), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "SIGTERM received: saved step" in stderr
    saved = checkpoint.RunCheckpoints(str(workdir), async_save=False)
    assert saved.latest_step() is not None and 0 < saved.latest_step() < 100000
    saved.close()


def test_branch_decays_from_the_stable_checkpoint_and_never_rebranches(corpus, tmp_path):
    source, branch = tmp_path / "stable", tmp_path / "branch"
    cfg = tiny_run_config(corpus / "low", train__steps=12, schedule__warmup_steps=2, schedule__stable_steps=10,
                          schedule__decay_steps=0, checkpoint__keep_every_steps=4)
    train_run(cfg, source)
    assert {4, 8, 12} <= set(checkpoint.RunCheckpoints(str(source), async_save=False).all_steps())

    branch_cfg = create_branch(str(source), 8, str(branch), decay_steps=6,
                               overrides=[f"data.mixtures.decay={corpus / 'high'}:1"])
    assert branch_cfg.train.steps == 14 and branch_cfg.schedule.stable_steps == 6
    # The branch's first checkpoint is the source's step 8, and it names its parent.
    branched = checkpoint.RunCheckpoints(str(branch), async_save=False)
    meta = branched.restore_meta(8)
    branched.close()
    assert meta.parent == {"run": str(source), "step": 8} and meta.phase == "stable" and not meta.weights_only
    train_lib.train(branch_cfg, str(branch))

    lrs = {m["step"]: m["lr"] for m in read_metrics(branch) if "lr" in m}
    peak, ratio = cfg.schedule.peak_lr, cfg.schedule.final_lr_ratio
    for step in range(9, 15):  # the update of step s uses the lr of count s − 1
        expected = peak * ratio ** ((step - 1 - 8) / 6)
        np.testing.assert_allclose(lrs[step], expected, rtol=1e-5)
    assert {m["phase"] for m in read_metrics(branch) if "phase" in m} == {"decay"}

    # Restarting the branch resumes its own latest checkpoint: nothing is re-branched or re-run.
    before = (branch / "metrics.jsonl").read_text()
    again = create_branch(str(source), 8, str(branch), decay_steps=6)
    assert train_lib.train(again, str(branch)) == {}
    assert (branch / "metrics.jsonl").read_text() == before
    final = checkpoint.RunCheckpoints(str(branch), async_save=False)
    final_meta = final.restore_meta(14)
    assert final.latest_step() == 14 and final_meta.parent["step"] == 8 and final_meta.phase == "decay"
    assert final_meta.config == branch_cfg.to_dict() and final_meta.layout == checkpoint.PARAMS_LAYOUT
    final.close()


def test_a_decayed_run_goes_back_to_the_peak_only_when_asked(corpus, tmp_path, capsys):
    source, branch = tmp_path / "run", tmp_path / "rewarmed"
    cfg = tiny_run_config(corpus / "low")  # stable to step 8, decay to 12; checkpoints 4, 8 (stable) and 12 (decay)
    train_run(cfg, source)
    branch_args = ["branch", "--from", str(source), "--step", "12", "--workdir", str(branch), "--decay-steps", "2",
                   "--no-train"]
    assert cli.main(branch_args) == 2
    err = capsys.readouterr().err
    assert f"step 12 of {source} is a decay-phase checkpoint" in err
    assert f"Branch from a stable-phase step of {source}: [4, 8]" in err and "--allow-decay-checkpoint" in err
    assert not branch.exists()

    assert cli.main(["extend", "--workdir", str(source), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert f"the latest checkpoint of {source}, step 12, is in its decay (from step 8 on)" in err
    assert "one of steps [4, 8]" in err and f"branch --from {source}" in err
    longer = tiny_run_config(corpus / "low", train__steps=20, schedule__stable_steps=14)
    with pytest.raises(ConfigError, match="differs at schedule.stable_steps, train.steps: the latest checkpoint") \
            as refused:
        train_lib.prepare_workdir(str(source), longer)
    assert f"extend --workdir {source}" not in str(refused.value)  # extending cannot help a run past its stable phase
    assert checkpoint.read_run_config(str(source)).train.steps == 12

    assert cli.main(branch_args + ["--allow-decay-checkpoint"]) == 0
    rewarmed = checkpoint.read_run_config(str(branch))
    lr = optim.make_schedule(rewarmed.schedule, rewarmed.train.steps)
    # The source annealed to below 0.2 of the peak by step 12; the branch trains its step 12 at the peak again.
    assert float(optim.make_schedule(cfg.schedule, cfg.train.steps)(11)) < 0.2 * cfg.schedule.peak_lr
    assert float(lr(12)) == pytest.approx(cfg.schedule.peak_lr)
    branched = checkpoint.RunCheckpoints(str(branch), async_save=False)
    assert branched.all_steps() == [12] and branched.restore_meta(12).parent == {"run": str(source), "step": 12}
    branched.close()

    # An extension written while the run went on into its old decay: resuming it would re-warm the lr, so it is refused.
    checkpoint.write_run_config(str(source), longer)
    with pytest.raises(ConfigError, match=f"cannot resume with its config.json: the latest checkpoint of {source}, "
                                          "step 12, is in its decay"):
        train_lib.prepare_workdir(str(source), None)


@pytest.fixture(scope="module")
def open_ended_run(corpus, tmp_path_factory) -> Path:
    """8 steps of a WSD run with no decay (schedule.decay_steps=0 holds the peak), its phases as fractions."""
    workdir = tmp_path_factory.mktemp("open_ended") / "run"
    train_run(tiny_run_config(corpus / "low", train__steps=8, schedule__warmup_steps=0.25, schedule__stable_steps=0.75,
                           schedule__decay_steps=0.0), workdir)
    return workdir


def test_plans_that_would_change_trained_steps_are_refused(corpus, open_ended_run, capsys):
    before = (open_ended_run / checkpoint.CONFIG_FILE).read_text()
    # As a fraction of a longer run, the warmup (0.25) would grow from 2 to 4 steps under steps already trained.
    longer = tiny_run_config(corpus / "low", train__steps=14, schedule__warmup_steps=0.25,
                             schedule__stable_steps=0.75, schedule__decay_steps=0.0)
    message = (r"differs at train.steps: with train.steps=14 \(warmup 4, stable 10, decay 0 steps\) the lr of step 1, "
               r"which the run has already trained \(its latest checkpoint is step 8\), would change from 0.005 to "
               r"0.0025")
    with pytest.raises(ConfigError, match=message) as refused:
        train_lib.prepare_workdir(str(open_ended_run), longer)
    assert f"minicpm-jax extend --workdir {open_ended_run} --steps N" in str(refused.value)

    for args, message in [
        (["--steps", "6"], "train.steps=6 is below the latest checkpoint, step 8"),
        (["--steps", "10", "--decay-steps", "4"], "with train.steps=10 (warmup 2, stable 4, decay 4 steps) the decay "
                                                  "would start at step 6, before the latest checkpoint, step 8: steps "
                                                  "already trained would change their lr and data. Start the decay at "
                                                  "step 8 or later (train.steps >= 12 for a 4-step decay at the end)"),
        (["--steps", "3", "--decay-steps", "2"], "--steps 3 is shorter than the run's 2-step warmup and its 2-step "
                                                 "decay"),
    ]:
        assert cli.main(["extend", "--workdir", str(open_ended_run), *args]) == 2
        assert f"cannot extend {open_ended_run} to {args[1]} steps: {message}" in capsys.readouterr().err
    assert (open_ended_run / checkpoint.CONFIG_FILE).read_text() == before


@pytest.mark.parametrize("how", ["extend", "resume with a larger train.steps"])
def test_extended_run_equals_one_planned_that_long(corpus, open_ended_run, tmp_path, how):
    workdir, straight = tmp_path / "extended", tmp_path / "straight"
    shutil.copytree(open_ended_run, workdir)
    if how == "extend":  # to 14 steps, the stable phase to step 10 and a 4-step decay after it
        assert cli.main(["extend", "--workdir", str(workdir), "--steps", "14", "--decay-steps", "4"]) == 0
        planned = tiny_run_config(corpus / "low", train__steps=14, schedule__stable_steps=8, schedule__decay_steps=4)
        train_run(None, workdir)
    else:  # an open-ended stable phase goes on at the peak
        planned = tiny_run_config(corpus / "low", train__steps=14, schedule__decay_steps=0)
        train_run(planned, workdir)
    train_run(planned, straight)

    assert checkpoint.read_run_config(str(workdir)).train.steps == 14
    assert_same_run(workdir, straight, 14)
    lrs = {m["step"]: m["lr"] for m in read_metrics(workdir) if "lr" in m}
    assert lrs == {m["step"]: m["lr"] for m in read_metrics(straight) if "lr" in m}


def test_decay_phase_reads_the_decay_mixture(corpus):
    from minicpm_jax.config import DataConfig
    from minicpm_jax.data.feed import DataFeed

    data_cfg = DataConfig.from_config({"mixtures": {"stable": f"{corpus / 'low'}:1", "decay": f"{corpus / 'high'}:1"}})
    feed = DataFeed(data_cfg, lambda step: "decay" if step >= 3 else "stable", 32, 4, 0, 1)
    feed.restore(0, None)
    for step in range(6):
        body = feed.next_batch(step)["tokens"]
        body = body[body > 2]  # drop BOS/EOS/padding
        assert (body < 64).all() if step < 3 else (body >= 64).all(), step
    saved = feed.state()
    expected = [feed.next_batch(step)["tokens"] for step in (6, 7)]
    feed.close()
    resumed = DataFeed(data_cfg, lambda step: "decay" if step >= 3 else "stable", 32, 4, 0, 1)
    resumed.restore(6, saved)
    for step, tokens in zip((6, 7), expected):
        np.testing.assert_array_equal(resumed.next_batch(step)["tokens"], tokens)
    resumed.close()


def test_half_written_checkpoint_is_never_restored(corpus, tmp_path):
    workdir = tmp_path / "run"
    train_run(tiny_run_config(corpus / "low", train__steps=8, schedule__stable_steps=2), workdir)
    # What a save killed midway leaves: Orbax's temporary folder, never renamed to its step.
    partial = workdir / "checkpoints" / "12.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 100)
    saved = checkpoint.RunCheckpoints(str(workdir), async_save=False)
    assert saved.latest_step() == 8 and 12 not in saved.all_steps()
    saved.close()
    model, _ = checkpoint.restore_model(str(workdir))
    assert model.config.num_layers == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    real_step = train_lib.make_train_step

    def diverging_after_step_6(*args):
        step_fn, calls = real_step(*args), []

        def step(params, opt_state, batch):
            params, opt_state, metrics = step_fn(params, opt_state, batch)
            calls.append(1)
            return params, opt_state, {**metrics, "loss": metrics["loss"] * (np.nan if len(calls) > 6 else 1.0)}

        return step

    monkeypatch.setattr(train_lib, "make_train_step", diverging_after_step_6)
    with pytest.raises(FloatingPointError, match="loss is nan at step 7; stopping. The last good checkpoint is step 4"):
        train_run(tiny_run_config(corpus / "low", train__steps=12), workdir)
    saved = checkpoint.RunCheckpoints(str(workdir), async_save=False)
    assert saved.all_steps() == [4]
    saved.close()


@pytest.mark.parametrize("override, message", [
    ({"schedule__decay_steps": 40}, "exceeds train.steps=12"),
    ({"train__global_batch_size": 6, "train__grad_accum_steps": 4}, "train.grad_accum_steps=4 must divide"),
    ({"optim__weight_decay_on": "1d"}, "optim.weight_decay_on='1d'"),
    ({"data__mixtures__stable": "/does/not/exist:1"}, "/does/not/exist"),
    ({"model__vocab_size": 48}, "low was tokenized with a 64-token vocabulary, but model.vocab_size=48"),
])
def test_bad_config_fails_before_any_compute(corpus, tmp_path, override, message):
    # Loading checks each section on its own; the run's plan checks sections against each other and the data.
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train_lib.prepare_workdir(str(tmp_path / "run"), tiny_run_config(corpus / "low", **override))
    assert not (tmp_path / "run").exists()


def test_grad_accumulation_matches_the_whole_batch(corpus, tmp_path):
    whole = tiny_run_config(corpus / "low", train__steps=4, schedule__stable_steps=0, schedule__decay_steps=2)
    accumulated = tiny_run_config(corpus / "low", train__steps=4, schedule__stable_steps=0, schedule__decay_steps=2,
                                  train__grad_accum_steps=2)
    train_run(whole, tmp_path / "whole")
    train_run(accumulated, tmp_path / "accumulated")
    a, b = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "accumulated")
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-5)


def test_demo_config_smoke(corpus, tmp_path):
    """A few steps of configs/demo.py itself (its real model size), with held-out evaluation."""
    from minicpm_jax import config as config_lib

    cfg = config_lib.load(REPO / "configs/demo.py", [
        "model.vocab_size=128", "train.steps=3", "train.seq_len=64", "train.log_every_steps=1",
        "schedule.warmup_steps=1", "schedule.stable_steps=1", "schedule.decay_steps=1", "data.tokenizer=''",
        "train.eval_every_steps=3", "train.eval_batches=2", f"data.mixtures.stable={corpus / 'low'}:1",
        f"data.val_dir={corpus / 'high'}"])
    last = train_run(cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert np.isfinite(last["loss"]) and last["tokens_per_sec"] > 0
    assert any("eval_loss" in r and np.isfinite(r["eval_bits_per_byte"]) for r in records)
    assert checkpoint.RunCheckpoints(str(tmp_path / "run"), async_save=False).latest_step() == 3


def test_a_run_that_trains_nothing_warns_then_stops_naming_the_step(corpus, tmp_path, caplog):
    from minicpm_jax.train.health import DeadRunError

    # scale_emb = 1e30 saturates every layer: the loss sits at ln V and the gradients are 0.
    cfg = tiny_run_config(corpus / "low", model__scale_emb=1e30, train__dead_run_windows=3)
    with pytest.raises(DeadRunError, match=r"^step 3: the gradient norm is exactly 0 for 3 log windows in a row: "
                                           r".* No checkpoint was saved yet$"):
        train_run(cfg, tmp_path / "run")
    assert "step 1: the gradient norm is exactly 0; the run stops if this lasts 3 log windows" in caplog.text
