"""Checkpoints are never lost: an unreadable latest checkpoint falls back to the previous one, a full disk
stops the run with its previous checkpoint intact, and only one process at a time trains a run directory.

Every resumed run is compared with the same run never interrupted: same losses, same final parameters.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicpm_jax.run import checkpoint
from minicpm_jax.train import loop as train_lib

from train_helpers import (
    assert_same_run,
    cli_command,
    fake_devices_env,
    losses_by_step,
    tiny_run_config,
    train_run,
    write_token_folder,
)


@pytest.fixture(scope="module")
def stable_dir(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "low", low=3, high=64, seed=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, stable_dir) -> Path:
    """The reference: the tiny 12-step run, never interrupted, with checkpoints at steps 4, 8 and 12."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train_run(tiny_run_config(stable_dir), run)
    return run


def _resume(run: Path) -> None:
    """Resumes `run` through the path under test: train -> _initial_state -> restore_latest_readable."""
    train_lib.train(checkpoint.read_run_config(str(run)), str(run))


def _damage(item_dir: Path, how: str) -> None:
    """Damages the largest file of a checkpoint item (its array data or its JSON): truncates it to half, deletes
    it, or flips the lowest bit of one byte (array data: the middle byte; JSON: the first digit from the middle
    on, so that the file still parses, with another number)."""
    largest = max((path for path in item_dir.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)
    if how == "truncate":
        os.truncate(largest, largest.stat().st_size // 2)
    elif how == "delete":
        largest.unlink()
    else:
        data = bytearray(largest.read_bytes())
        try:
            json.loads(data)
            position = next(i for i in range(len(data) // 2, len(data)) if chr(data[i]).isdigit())
        except ValueError:
            position = len(data) // 2
        data[position] ^= 1
        largest.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip a bit"])
@pytest.mark.parametrize("item", ["params", "opt_state", "data", "meta"])
def test_a_damaged_latest_checkpoint_is_never_used_and_the_run_resumes_from_the_previous_one(
        straight, tmp_path, caplog, item, how):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _damage(run / "checkpoints" / "12" / item, how)
    with caplog.at_level(logging.INFO, logger="minicpm_jax"):
        _resume(run)
    # A file that reads back without an error is caught by the checksums (or the digest) saved with the step.
    found = "fails verification" if how == "flip a bit" else "does not restore"
    assert f"step 12: item {item} ({run}/checkpoints/12/{item}) {found}: " in caplog.text
    assert "resuming from step 8 of" in caplog.text
    # Set aside, not deleted, so that the run could save its step 12 again.
    assert [path.name.split("-")[0] for path in (run / "checkpoints").glob("*.unreadable-*")] == ["12.unreadable"]
    assert_same_run(run, straight)


def test_a_flipped_bit_in_params_is_refused_by_every_reader_of_the_step(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    _damage(run / "checkpoints" / "12" / "params", "flip a bit")
    with pytest.raises(checkpoint.UnreadableCheckpointError, match=r"step 12: item params .* fails verification: "):
        checkpoint.restore_model(str(run))  # generate, eval and export-hf read through this


def test_no_readable_checkpoint_is_an_error_naming_each_step_and_why(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for step in (4, 8, 12):
        _damage(run / "checkpoints" / str(step) / "params", "truncate")
    with pytest.raises(checkpoint.UnreadableCheckpointError) as failure:
        _resume(run)
    lines = str(failure.value).splitlines()
    assert lines[0] == f"no checkpoint of {run} restores:"
    for line, step in zip(lines[1:4], (12, 8, 4), strict=True):
        assert line.startswith(f"  step {step}: item params ({run}/checkpoints/{step}/params) does not restore: ")
    assert {path.name for path in (run / "checkpoints").iterdir()} == {"4", "8", "12"}  # nothing set aside
    with checkpoint.run_lock(str(run)):  # and train released its lock on the way out
        pass


_SMALL_FILESYSTEMS = {  # name -> the commands that mount one of 8 MiB at `point` (`image`: a file to hold it)
    "tmpfs": lambda point, image: [["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", point]],
    "loop-mounted ext2 image": lambda point, image: [["truncate", "-s", "8M", image], ["mkfs.ext2", "-q", "-F", image],
                                                     ["mount", "-o", "loop", image, point]],
}


def _first_failure(commands: list[list[str]]) -> str | None:
    for command in commands:
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError as error:
            return str(error)
        if result.returncode:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()}"
    return None


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """RUN/checkpoints on a filesystem of its own, small enough to fill; unmounted afterwards."""
    point = tmp_path / "run" / "checkpoints"
    point.mkdir(parents=True)
    failures = []
    for name, commands in _SMALL_FILESYSTEMS.items():
        failure = _first_failure(commands(str(point), str(tmp_path / "disk.img")))
        if failure is None:
            try:
                yield point
            finally:  # lazily if still busy: the test must never leave a mount behind
                if subprocess.run(["umount", str(point)]).returncode:
                    subprocess.run(["umount", "-l", str(point)], check=True)
            return
        failures.append(f"{name}: {failure}")
    pytest.skip("cannot mount a small filesystem to fill (this needs root or CAP_SYS_ADMIN): " + "; ".join(failures))


def _fill(disk: Path, leave_bytes: int) -> None:
    """Fills `disk` to its last byte, then frees `leave_bytes` of it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    os.truncate(filler, filler.stat().st_size - leave_bytes)


# With nothing left a save fails at once; with a little left, an asynchronous save fails in the background.
@pytest.mark.parametrize("async_save, leave_bytes", [(False, 0), (True, 256 * 1024)], ids=["sync", "async"])
def test_disk_full_during_a_save_stops_the_run_and_keeps_the_previous_checkpoint(
        stable_dir, straight, small_disk, monkeypatch, async_save, leave_bytes):
    run = small_disk.parent
    real_save = checkpoint.RunCheckpoints.save

    def save_on_a_full_disk(self, step, *args):
        if step == 8:
            self.wait()  # step 4's asynchronous save has committed: the disk fills under step 8 only
            _fill(small_disk, leave_bytes)
        real_save(self, step, *args)
        while step == 8 and self.manager.is_saving_in_progress():  # until the background write has failed
            time.sleep(0.01)

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", save_on_a_full_disk)
    # keep_last=1: had retention deleted step 4 for the step 8 that failed, no checkpoint would be left.
    cfg = tiny_run_config(stable_dir, checkpoint__keep_last=1, checkpoint__async_save=async_save)
    with pytest.raises(checkpoint.CheckpointSaveError) as failure:
        train_run(cfg, run)
    message = str(failure.value)
    assert message.startswith(f"checkpoint step 8 was not saved to {small_disk}: the disk is full (ENOSPC): ")
    assert message.endswith(f"The latest committed checkpoint is step 4; free some space, then `train --workdir {run}` "
                            f"resumes from it")
    # A synchronous save stops the run at step 8; an asynchronous one that failed by then stops it before step 9.
    assert max(losses_by_step(run)) == 8
    saved = checkpoint.RunCheckpoints(str(run), async_save=False)
    assert saved.all_steps() == [4]  # and the partial step 8 is no checkpoint
    saved.close()

    monkeypatch.undo()
    (small_disk / "filler").unlink()
    train_run(None, run)
    assert_same_run(run, straight)


def test_second_train_on_a_run_refuses_naming_the_holder(stable_dir, tmp_path):
    run = tmp_path / "run"
    train_lib.prepare_workdir(str(run), tiny_run_config(stable_dir))
    with checkpoint.run_lock(str(run)):
        second = subprocess.run(cli_command("train", "--workdir", str(run)), env=fake_devices_env(1),
                                capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    holder = f"{run} is already being trained by host {socket.gethostname()}, pid {os.getpid()}, started "
    assert re.search(re.escape(holder) + r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", second.stderr), second.stderr
    assert not (run / "metrics.jsonl").exists() and not any((run / "checkpoints").glob("*"))  # it trained nothing


def test_lock_of_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from minicpm_jax.run.checkpoint import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(checkpoint.RunDirError, match=f"pid {holder.pid}, started "):
            with checkpoint.run_lock(str(run)):
                pass
    finally:
        holder.kill()  # SIGKILL: the holder gets no chance to release anything
        holder.wait()
    assert f"pid {holder.pid}," in (run / "train.lock").read_text()  # the dead holder's lock file is still there
    with checkpoint.run_lock(str(run)):
        assert f"pid {os.getpid()}," in (run / "train.lock").read_text()


@pytest.mark.parametrize("every_minutes, saved_steps", [(1e-6, [5, 10, 15, 20, 25, 30]), (60.0, [10, 20, 30])],
                         ids=["due-at-every-log-step", "never-due"])
def test_timed_saves_are_resume_points_that_the_next_save_replaces(every_minutes, saved_steps, stable_dir, tmp_path,
                                                                   monkeypatch):
    on_disk_before_save = {}
    real_save = checkpoint.RunCheckpoints.save

    def recording_save(self, step, *args, **kwargs):
        self.wait()
        on_disk_before_save[step] = self.all_steps()
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save", recording_save)
    cfg = tiny_run_config(stable_dir, train__steps=30, train__log_every_steps=5, checkpoint__every_steps=10,
                          checkpoint__keep_last=2, checkpoint__every_minutes=every_minutes)
    train_run(cfg, tmp_path / "run")
    assert sorted(on_disk_before_save) == saved_steps
    if every_minutes < 1:  # the timed step 15 lived until step 20's save, then went; 25 likewise until 30
        assert on_disk_before_save[20] == [10, 15] and on_disk_before_save[30] == [10, 20, 25]
    saved = checkpoint.RunCheckpoints(str(tmp_path / "run"))
    assert saved.all_steps() == [20, 30]  # keep_last=2 of the every_steps cadence
    saved.close()
