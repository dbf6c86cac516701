"""What a run reports as it trains: progress lines with an ETA, metrics.jsonl that a resume continues line for
line, TensorBoard tags grouped with the config, and W&B in offline mode."""

from __future__ import annotations

import glob
import json
import logging
import struct
from pathlib import Path

import pytest

from minicpm_jax.progress import Ticker, duration, human_count
from minicpm_jax.run import checkpoint
from minicpm_jax.run.branch import create_branch
from minicpm_jax.train import loop as train_lib
from minicpm_jax.train.progress import CLOCK_FIELDS

from align_helpers import copy_interrupted_at
from train_helpers import read_metrics, tiny_run_config, train_run, write_token_folder

STEPS, BATCH, SEQ = 12, 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "low", low=3, high=64, seed=0)


def _config(corpus: Path, **overrides):
    # Logged every 3 steps, saved every 4: a resume from step 4 or 8 starts in the middle of a log window.
    return tiny_run_config(corpus, train__steps=STEPS, train__log_every_steps=3, checkpoint__every_steps=4,
                           checkpoint__keep_last=10, **overrides)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("reference") / "run"
    train_run(_config(corpus), workdir)
    return workdir


def _without_clock(lines: list[dict]) -> list[dict]:
    return [{key: value for key, value in line.items() if key not in CLOCK_FIELDS} for line in lines]


@pytest.mark.parametrize("resume_step", [4, 8])
def test_a_resume_mid_window_logs_the_uninterrupted_runs_lines(reference, tmp_path, resume_step):
    workdir = tmp_path / "run"
    copy_interrupted_at(reference, resume_step, workdir)
    train_run(None, workdir)
    resumed, uninterrupted = read_metrics(workdir), read_metrics(reference)
    assert [line["step"] for line in resumed] == [3, 6, 9, 12]
    assert _without_clock(resumed) == _without_clock(uninterrupted)


def test_lines_carry_time_tokens_seen_and_elapsed_and_the_log_shows_an_eta(corpus, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="minicpm_jax.train.loop"):
        train_run(_config(corpus), tmp_path / "run")
    lines = read_metrics(tmp_path / "run")
    assert [line["tokens_seen"] for line in lines] == [step * BATCH * SEQ for step in (3, 6, 9, 12)]
    times, elapsed = [line["time"] for line in lines], [line["elapsed_s"] for line in lines]
    assert times == sorted(times) and elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all(line["step_time_s"] > 0 for line in lines)
    progress_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert progress_lines[0].startswith(f"step 3/{STEPS} (25%)")
    assert "s/step" in progress_lines[0] and "384 tokens" in progress_lines[0] and "ETA 0:00:" in progress_lines[0]
    assert "1.54K tokens" in progress_lines[-1] and "ETA 0:00:00" in progress_lines[-1]


def test_a_branch_continues_its_parents_token_count(corpus, reference, tmp_path):
    branch = tmp_path / "branch"
    cfg = create_branch(str(reference), 8, str(branch), decay_steps=4)
    train_lib.train(cfg, str(branch))
    lines = read_metrics(branch)
    assert [line["step"] for line in lines] == [9, 12]
    assert [line["tokens_seen"] for line in lines] == [9 * BATCH * SEQ, 12 * BATCH * SEQ]
    saved = checkpoint.RunCheckpoints(str(branch), async_save=False)
    assert saved.restore_meta(8).progress["tokens_seen"] == 8 * BATCH * SEQ
    saved.close()


def _tensorboard_events(path: str) -> list[bytes]:
    """The payloads of a TFRecord file: each is u64 length, u32 crc, payload, u32 crc."""
    data, position, payloads = Path(path).read_bytes(), 0, []
    while position < len(data):
        (length,) = struct.unpack("<Q", data[position:position + 8])
        payloads.append(data[position + 12:position + 12 + length])
        position += 16 + length
    return payloads


def _wandb_records(path: str) -> list[bytes]:
    """The payloads of a W&B run file: a 7-byte header, then a LevelDB-style log of 32 KiB blocks whose records
    are u32 crc, u16 length, u8 type (1 whole, 2 first, 3 middle, 4 last piece), payload."""
    data, position, payloads, pending = Path(path).read_bytes(), 7, [], b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    return payloads


def test_tensorboard_tags_are_grouped_and_hold_the_config(reference):
    from tensorboardX.proto import event_pb2

    tags, texts = set(), []
    for path in glob.glob(str(reference / "tensorboard" / "events.out.tfevents.*")):
        for payload in _tensorboard_events(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                tags.add(value.tag)
                if value.metadata.plugin_data.plugin_name == "text":
                    texts.append(value.tensor.string_val[0].decode())
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_seen"} <= tags
    assert not {tag for tag in tags if "/" not in tag} - {"config"}, tags  # every scalar is in a group
    assert "_hparams_/experiment" in tags and any('"peak_lr"' in text for text in texts)


def test_wandb_offline_gets_the_config_and_the_same_scalars(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="W&B is the optional wandb extra")
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    train_run(_config(corpus, train__wandb_project="minicpm-test"), workdir)
    (run_file,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    def name(item) -> str:  # W&B stores a key with "/" as its path
        return item.key or "/".join(item.nested_key)

    history, config = {}, {}
    for payload in _wandb_records(run_file):
        record = wandb_internal_pb2.Record.FromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = {name(item): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "run":
            config.update({name(item): json.loads(item.value_json) for item in record.run.config.update})
    logged = {line["step"]: line for line in read_metrics(workdir)}
    assert sorted(history) == sorted(logged) == [3, 6, 9, 12]
    for step, line in logged.items():
        assert history[step]["train/loss"] == pytest.approx(line["loss"], rel=1e-12)
    assert config["schedule.peak_lr"] == 0.01 and config["train.steps"] == STEPS


def test_durations_and_counts_read_as_people_write_them():
    assert duration(0) == "0:00:00" and duration(3725.4) == "1:02:05" and duration(90000) == "1d 1:00:00"
    assert human_count(384) == "384" and human_count(1536) == "1.54K" and human_count(4.2e9) == "4.2B"


def test_a_ticker_reports_done_of_total_with_an_eta_and_always_its_last_item(caplog):
    with caplog.at_level(logging.INFO, logger="minicpm_jax.progress"):
        ticker = Ticker("eval", 4, "batches", every_seconds=3600)
        for _ in range(4):
            ticker.update()
    (line,) = [r.getMessage() for r in caplog.records]  # nothing until the last batch, an hour being long
    assert line.startswith("eval: 4/4 batches (100%)") and "batches/s" in line and line.endswith("ETA 0:00:00")
    unknown = Ticker("prepare", None, "documents", every_seconds=0)
    unknown.update(7)
    assert unknown.line().startswith("prepare: 7 documents  ") and "ETA" not in unknown.line()
