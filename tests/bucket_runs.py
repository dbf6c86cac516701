"""What the object-storage tests do on any bucket (tests/test_object_storage*.py): the console script in a
subprocess from a working directory that holds none of its inputs, a tiny run, prepared data in the bucket,
and a run killed with SIGKILL in the middle of a save; `module_fixtures` gives a test module all of them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from minicpm_jax import storage
from minicpm_jax.run import checkpoint

import storage_emulator
from data_helpers import sample_texts, train_small_tokenizer
from train_helpers import DEMO_CONFIG, cli_command, fake_devices_env


def run_items(steps: int, every: int) -> list[str]:
    """configs/demo.py overrides: a 2-layer d=64 model on 4x32-token batches, 2 data-parallel devices, WSD over
    `steps` steps (1/16 warmup, 3/16 decay), a checkpoint every `every` steps and a kept one every 2 * `every`."""
    warmup, decay = steps // 16, steps * 3 // 16
    return ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
            "model.num_heads=2", "model.num_kv_heads=1", "model.dim_model_base=32",
            "model.max_position_embeddings=64", "train.global_batch_size=4", "train.seq_len=32",
            f"train.steps={steps}", "train.log_every_steps=1", "train.eval_every_steps=0",
            f"schedule.warmup_steps={warmup}", f"schedule.stable_steps={steps - warmup - decay}",
            f"schedule.decay_steps={decay}", f"checkpoint.every_steps={every}",
            f"checkpoint.keep_every_steps={2 * every}", "data.num_shards=2", "mesh.data=2", "mesh.fsdp=1"]


def run_cli(*args: str, cwd: Path, devices: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cli_command(*args), cwd=cwd, env=fake_devices_env(devices), capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def prepare_data(store, root: Path, cwd: Path, documents: int = 400) -> dict[str, str]:
    """Text prepared by `prepare-data --out BUCKET/data` (train/ and val/) with a tokenizer trained in `root`:
    the folders' URLs and the local tokenizer's path."""
    tokenizer = train_small_tokenizer(root)
    (root / "raw").mkdir()
    for index, text in enumerate(sample_texts(documents)):
        (root / "raw" / f"{index}.txt").write_text(text)
    run_cli("prepare-data", "--input", str(root / "raw"), "--tokenizer", str(tokenizer), "--out", store.url("data"),
            "--val-fraction", "0.1", "--num-shards", "2", cwd=cwd)
    return {"train": store.url("data", "train"), "val": store.url("data", "val"), "tokenizer": str(tokenizer)}


def train_args(workdir: str, data: dict[str, str], items: list[str]) -> list[str]:
    return ["train", "--config", str(DEMO_CONFIG), "--workdir", workdir,
            *[f"--config.{item}" for item in items + [f"data.mixtures.stable={data['train']}:1",
                                                       f"data.val_dir={data['val']}",
                                                       f"data.tokenizer={data['tokenizer']}"]]]


def losses(workdir: str) -> dict[int, float]:
    lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def params(workdir: str, step: int | None = None):
    from flax import nnx

    model, _ = checkpoint.restore_model(workdir, step)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def committed(workdir: str, step: int) -> bool:
    return storage.is_file(storage.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def committed_steps(workdir: str) -> list[int]:
    checkpoints = checkpoint.RunCheckpoints(workdir, async_save=False)
    try:
        return checkpoints.all_steps()
    finally:
        checkpoints.close()


def kill_during_second_save_then_resume(store, name: str, data: dict[str, str], items: list[str], steps: int,
                                        every: int, cwd: Path) -> str:
    """Trains BUCKET/runs/NAME, kills it with SIGKILL in the middle of saving its second checkpoint (its first
    objects are in the bucket, its commit_success.txt is not), checks that only the first step counts, and
    resumes it from the bucket alone (its own config.json). Returns the run's URL."""
    workdir = store.url("runs", name)
    process = subprocess.Popen(cli_command(*train_args(workdir, data, items)), cwd=cwd, env=fake_devices_env(2),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while (time.time() < deadline and process.poll() is None
           and not store.files(f"runs/{name}/checkpoints/{2 * every}")):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1]
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    assert committed(workdir, every) and not committed(workdir, 2 * every), \
        f"the kill missed the save: {store.files(f'runs/{name}/checkpoints')}"
    assert committed_steps(workdir) == [every]  # the half-saved step is no step
    interrupted = max(losses(workdir))
    assert every <= interrupted < steps
    run_cli("train", "--workdir", workdir, cwd=cwd)
    return workdir


def module_fixtures(kind: type[storage_emulator.Emulator], steps: int, every: int, documents: int = 400):
    """A test module's fixtures (module-scoped), to assign at its top level:

    store       the emulator (`kind`), with the bucket minicpm-test
    elsewhere   the working directory of every command: it holds none of their inputs
    data        text prepared by `prepare-data --out BUCKET/data` (`prepare_data`)
    reference   the uninterrupted run on a local disk (reading the same data from the bucket)
    bucket_run  the same run in the bucket, killed with SIGKILL in the middle of saving its second checkpoint,
                then resumed (`kill_during_second_save_then_resume`)
    """
    items = run_items(steps, every)

    @pytest.fixture(scope="module")
    def store(tmp_path_factory):
        yield from storage_emulator.emulator(kind, "minicpm-test", str(tmp_path_factory.mktemp("cache")))

    @pytest.fixture(scope="module")
    def elsewhere(tmp_path_factory) -> Path:
        return tmp_path_factory.mktemp("elsewhere")

    @pytest.fixture(scope="module")
    def data(store, tmp_path_factory, elsewhere) -> dict[str, str]:
        return prepare_data(store, tmp_path_factory.mktemp("inputs"), elsewhere, documents)

    @pytest.fixture(scope="module")
    def reference(data, tmp_path_factory, elsewhere) -> Path:
        workdir = tmp_path_factory.mktemp("local") / "run"
        run_cli(*train_args(str(workdir), data, items), cwd=elsewhere)
        return workdir

    @pytest.fixture(scope="module")
    def bucket_run(store, data, reference, elsewhere) -> str:
        return kill_during_second_save_then_resume(store, "main", data, items, steps, every, elsewhere)

    return store, elsewhere, data, reference, bucket_run
