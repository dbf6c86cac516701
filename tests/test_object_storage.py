"""The same commands on a bucket as on a local path, against a real GCS emulator (tests/storage_emulator.py).

Every command runs as users run it (the console script in a subprocess, from a working directory that holds
none of its inputs) with gs:// paths only: prepare-data into a bucket, train, kill -9 mid-run and resume with
the losses and parameters of an uninterrupted local run, branch, eval, generate, export-hf and import-hf, and a
2-process job (jax.distributed on 127.0.0.1) whose shared run directory is the bucket. The emulator starts and
stops with this module and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from minicpm_jax import storage
from minicpm_jax.run import checkpoint

import storage_emulator
from bucket_runs import losses, module_fixtures, params, run_cli, run_items, train_args
from train_helpers import DEMO_CONFIG, cli_command, start_processes

STEPS, EVERY = 160, 20
ITEMS = run_items(STEPS, EVERY)
store, elsewhere, data, reference, bucket_run = module_fixtures(storage_emulator.GcsEmulator, STEPS, EVERY)


@pytest.fixture(scope="module")
def gcs(store):
    return store


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
    processes = start_processes(cli_command(*train_args(workdir, data, ITEMS)), 2, 1)
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


def test_a_sweep_in_a_bucket_writes_its_table_there_and_resumes_from_it(gcs, data, elsewhere):
    """Two tiny points with their sweep directory on gs://; then a point whose result was lost (a crash after
    its last checkpoint) is finished by `sweep --resume` from the bucket alone, and the finished one skipped."""
    from minicpm_jax.science import sweep as sweep_lib

    steps = 8
    sweep_dir = gcs.url("sweeps", "lr")
    items = run_items(steps, steps) + [f"data.mixtures.stable={data['train']}:1", f"data.val_dir={data['val']}",
                                       f"data.tokenizer={data['tokenizer']}"]
    run_cli("sweep", "--config", str(DEMO_CONFIG), "--out", sweep_dir, "--grid", "schedule.peak_lr=0.01,0.02",
            *[f"--config.{item}" for item in items], cwd=elsewhere)
    first, second = (f"points/{point.name}" for point in sweep_lib.grid({"schedule.peak_lr": [0.01, 0.02]}))
    files = set(gcs.files("sweeps/lr"))
    assert {"sweep.json", "results.jsonl", "results.csv", f"{first}/result.json", f"{second}/result.json",
            f"{first}/config.json", f"{first}/checkpoints/{steps}/commit_success.txt"} <= files
    rows = [json.loads(line) for line in storage.read_text(storage.join(sweep_dir, "results.jsonl")).splitlines()]
    assert [(row["settings"], row["status"], row["step"]) for row in rows] == [
        ({"schedule.peak_lr": 0.01}, "done", steps), ({"schedule.peak_lr": 0.02}, "done", steps)]
    assert storage.read_text(storage.join(sweep_dir, "results.csv")).splitlines()[0].startswith("schedule.peak_lr,")

    kept = storage.read_bytes(storage.join(sweep_dir, first, "result.json"))
    for name in (f"{second}/result.json", "results.jsonl", "results.csv"):
        storage.remove(storage.join(sweep_dir, name))
    resumed = run_cli("sweep", "--resume", sweep_dir, cwd=elsewhere)
    assert "done, skipped" in resumed.stderr
    assert storage.read_bytes(storage.join(sweep_dir, first, "result.json")) == kept
    assert losses(storage.join(sweep_dir, second)).keys() == set(range(1, steps + 1))  # nothing trained twice
    rows = [json.loads(line) for line in storage.read_text(storage.join(sweep_dir, "results.jsonl")).splitlines()]
    assert [(row["status"], row["step"]) for row in rows] == [("done", steps), ("done", steps)]
