"""The same commands on a bucket as on a local path, against a real GCS emulator (tests/storage_emulator.py).

Every command runs as users run it (the console script in a subprocess, from a working directory that holds
none of its inputs) with gs:// paths only: prepare-data into a bucket, train, kill -9 mid-run and resume with
the losses and parameters of an uninterrupted local run, branch, eval, generate, export-hf and import-hf, and a
2-process job (jax.distributed on 127.0.0.1) whose shared run directory is the bucket. The emulator starts and
stops with this module and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from minicpm_jax import storage
from minicpm_jax.run import checkpoint

import storage_emulator
from data_helpers import sample_texts, train_small_tokenizer
from train_helpers import DEMO_CONFIG, cli_command, fake_devices_env, start_processes

STEPS, EVERY = 160, 20
ITEMS = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
         "model.num_heads=2", "model.num_kv_heads=1", "model.dim_model_base=32", "model.max_position_embeddings=64",
         "train.global_batch_size=4", "train.seq_len=32", f"train.steps={STEPS}", "train.log_every_steps=1",
         "train.eval_every_steps=0", "schedule.warmup_steps=10", "schedule.stable_steps=120",
         "schedule.decay_steps=30", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_every_steps=40",
         "data.num_shards=2", "mesh.data=2", "mesh.fsdp=1"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    yield from storage_emulator.emulator("minicpm-test", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """The working directory of every command: it holds none of their inputs."""
    return tmp_path_factory.mktemp("elsewhere")


def run_cli(*args: str, cwd: Path, devices: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cli_command(*args), cwd=cwd, env=fake_devices_env(devices), capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def data(gcs, tmp_path_factory, elsewhere) -> dict[str, str]:
    """Text prepared by `prepare-data --out gs://...` (train/ and val/), and the local tokenizer it used."""
    root = tmp_path_factory.mktemp("inputs")
    tokenizer = train_small_tokenizer(root)
    (root / "raw").mkdir()
    for index, text in enumerate(sample_texts(400)):
        (root / "raw" / f"{index}.txt").write_text(text)
    run_cli("prepare-data", "--input", str(root / "raw"), "--tokenizer", str(tokenizer), "--out", gcs.url("data"),
            "--val-fraction", "0.1", "--num-shards", "2", cwd=elsewhere)
    return {"train": gcs.url("data", "train"), "val": gcs.url("data", "val"), "tokenizer": str(tokenizer)}


def train_args(workdir: str, data: dict[str, str]) -> list[str]:
    return ["train", "--config", str(DEMO_CONFIG), "--workdir", workdir,
            *[f"--config.{item}" for item in ITEMS + [f"data.mixtures.stable={data['train']}:1",
                                                       f"data.val_dir={data['val']}",
                                                       f"data.tokenizer={data['tokenizer']}"]]]


def losses(workdir: str) -> dict[int, float]:
    lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def params(workdir: str, step: int | None = None):
    from flax import nnx

    model, _ = checkpoint.restore_model(workdir, step)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, elsewhere) -> Path:
    """The uninterrupted run, on a local disk (reading the same data from the bucket)."""
    workdir = tmp_path_factory.mktemp("local") / "run"
    run_cli(*train_args(str(workdir), data), cwd=elsewhere)
    return workdir


def _committed(workdir: str, step: int) -> bool:
    return storage.is_file(storage.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def _committed_steps(workdir: str) -> list[int]:
    checkpoints = checkpoint.RunCheckpoints(workdir, async_save=False)
    try:
        return checkpoints.all_steps()
    finally:
        checkpoints.close()


@pytest.fixture(scope="module")
def bucket_run(gcs, data, reference, elsewhere) -> str:
    """The same run in the bucket, killed with SIGKILL in the middle of saving its second checkpoint (its first
    objects are in the bucket, its commit_success.txt is not), then resumed."""
    workdir = gcs.url("runs", "main")
    process = subprocess.Popen(cli_command(*train_args(workdir, data)), cwd=elsewhere, env=fake_devices_env(2),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not gcs.files(f"runs/main/checkpoints/{2 * EVERY}"):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1]
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr[-3000:]}"
    assert _committed(workdir, EVERY) and not _committed(workdir, 2 * EVERY), "the kill missed the save"
    assert _committed_steps(workdir) == [EVERY]  # the half-saved step is no step
    interrupted = max(losses(workdir))
    assert EVERY <= interrupted < STEPS
    run_cli("train", "--workdir", workdir, cwd=elsewhere)  # resumes from the bucket alone: its own config.json
    return workdir


def test_a_run_killed_in_a_bucket_resumes_to_the_uninterrupted_runs_losses_and_weights(bucket_run, reference, gcs):
    resumed, straight = losses(bucket_run), losses(str(reference))
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no step lost or logged twice
    assert resumed == straight
    jax.tree.map(np.testing.assert_array_equal, params(bucket_run), params(str(reference)))
    files = gcs.files("runs/main")
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "data_sources.json"} <= set(files)
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in files)
    sources = json.loads(storage.read_text(storage.join(bucket_run, "data_sources.json")))
    assert set(sources) == {gcs.url("data", "train"), gcs.url("data", "val")}


def test_a_branch_between_buckets_equals_the_same_branch_on_local_disk(bucket_run, reference, gcs, elsewhere):
    branch = gcs.url("runs", "branch")
    for source, workdir in ((bucket_run, branch), (str(reference), str(reference.parent / "branch"))):
        run_cli("branch", "--from", source, "--step", "80", "--workdir", workdir, "--decay-steps", "20", cwd=elsewhere)
    assert losses(branch) == losses(str(reference.parent / "branch"))
    assert checkpoint.read_run_config(branch).data.tokenizer == storage.join(branch, "tokenizer.model")
    meta = checkpoint.RunCheckpoints(branch, async_save=False)
    try:
        assert meta.restore_meta(100).parent == {"run": bucket_run, "step": 80}
    finally:
        meta.close()


def test_eval_generate_export_and_import_work_on_bucket_paths(bucket_run, data, gcs, elsewhere):
    from minicpm_jax.hf import load_hf

    result = run_cli("eval", "--model", bucket_run, "--data", data["val"], "--seq-len", "32", "--batch-size", "4",
                     "--out", gcs.url("eval.json"), cwd=elsewhere)
    assert json.loads(storage.read_text(gcs.url("eval.json")))["held_out"][data["val"]]["bits_per_byte"] > 0, result
    text = run_cli("generate", "--model", bucket_run, "--prompt", "the quick", "--max-new-tokens", "4",
                   cwd=elsewhere).stdout
    assert text.startswith("the quick")

    hf_dir, imported = gcs.url("hf"), gcs.url("runs", "imported")
    run_cli("export-hf", "--workdir", bucket_run, "--out", hf_dir, "--arch", "granite", cwd=elsewhere)
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= set(gcs.files("hf"))
    model, _ = load_hf(hf_dir)
    from flax import nnx

    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), params(bucket_run))
    run_cli("import-hf", "--hf", hf_dir, "--workdir", imported, cwd=elsewhere)
    assert storage.read_bytes(storage.join(imported, "tokenizer.model")) == Path(data["tokenizer"]).read_bytes()
    jax.tree.map(np.testing.assert_array_equal, params(imported), params(bucket_run))


def test_two_processes_share_a_run_directory_in_a_bucket(gcs, data, reference):
    """One device per process, the reference's 2 data shards: the job computes the one-process run's losses."""
    workdir = gcs.url("runs", "two_processes")
    processes = start_processes(cli_command(*train_args(workdir, data)), 2, 1)
    for process in processes:
        stderr = process.communicate(timeout=600)[1]
        assert process.returncode == 0, stderr[-4000:]
    assert losses(workdir) == losses(str(reference))
    jax.tree.map(np.testing.assert_array_equal, params(workdir), params(str(reference)))


def test_shards_are_staged_once_and_their_read_throughput_is_measured(gcs, data, capsys):
    """ArrayRecord reads local files only: a bucket's shards are copied once per content into the cache."""
    from minicpm_jax.data import records

    payload = np.random.default_rng(0).integers(0, 2**31, size=(64 << 20) // 4, dtype=np.int32).tobytes()
    url = gcs.url("throughput", "shard.bin")
    storage.write_bytes(url, payload)
    started = time.perf_counter()
    local = storage.stage(url, storage.sha256(url))
    seconds = time.perf_counter() - started
    assert Path(local).read_bytes() == payload
    assert storage.stage(url, storage.sha256(url)) == local  # a cached copy is reused
    with capsys.disabled():
        print(f"\nstaged 64 MiB from the GCS emulator in {seconds:.2f} s: {64 / 1.048576 / seconds:.0f} MB/s "
              "(download and sha256 check)")
    manifest, shards = records.open_shards(data["train"])
    assert sum(len(shard) for shard in shards) == manifest["num_documents"]
