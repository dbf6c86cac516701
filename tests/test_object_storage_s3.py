"""The same commands on s3:// as on a local path, against a real S3 server (moto's server mode,
tests/storage_emulator.py): prepare-data into the bucket, train, kill -9 mid-save and resume to the losses and
weights of an uninterrupted local run, and export-hf into the bucket. The server starts and stops with this
module and listens on 127.0.0.1 only. tests/test_object_storage.py covers the rest on gs://.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from minicpm_jax import storage
from minicpm_jax.run import orbax_s3

import storage_emulator
from bucket_runs import losses, module_fixtures, params, run_cli

STEPS, EVERY = 60, 20
store, elsewhere, data, reference, bucket_run = module_fixtures(storage_emulator.S3Emulator, STEPS, EVERY,
                                                                documents=200)


@pytest.fixture(scope="module")
def s3(store):
    return store


def test_a_run_killed_in_an_s3_bucket_resumes_to_the_uninterrupted_runs_losses_and_weights(bucket_run, reference,
                                                                                             s3):
    resumed, straight = losses(bucket_run), losses(str(reference))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == straight
    jax.tree.map(np.testing.assert_array_equal, params(bucket_run), params(str(reference)))
    files = s3.files("runs/main")
    assert {"config.json", "metrics.jsonl", "tokenizer.model", "data_sources.json",
            f"checkpoints/{STEPS}/commit_success.txt"} <= set(files)
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in files)
    assert not any(".orbax-checkpoint-tmp" in name for name in files)  # written in place: a rename is a copy on S3
    sources = json.loads(storage.read_text(storage.join(bucket_run, "data_sources.json")))
    assert set(sources) == {s3.url("data", "train"), s3.url("data", "val")}


def test_export_hf_writes_an_s3_bucket_that_loads_back(bucket_run, s3, elsewhere):
    from flax import nnx

    from minicpm_jax.hf import load_hf

    hf_dir = s3.url("hf")
    run_cli("export-hf", "--workdir", bucket_run, "--out", hf_dir, cwd=elsewhere)
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= set(s3.files("hf"))
    model, _ = load_hf(hf_dir)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)), params(bucket_run))


def test_orbax_builds_s3_kvstores_at_the_environments_endpoint(monkeypatch):
    """Orbax alone builds no s3:// kvstore; orbax_s3 makes it build tensorstore's s3 driver, at the endpoint and
    region botocore reads, and leaves local paths as they were."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    local_before = tensorstore_utils.build_kvstore_tspec("/tmp/run/checkpoints/20/params", name="w")
    orbax_s3.enable()
    orbax_s3.enable()  # idempotent: no builder wrapped twice
    s3_spec = {"driver": "s3", "bucket": "bkt", "endpoint": "http://127.0.0.1:9", "aws_region": "eu-west-1"}
    ocdbt = tensorstore_utils.build_kvstore_tspec("s3://bkt/run/checkpoints/20/params", name="w")
    assert ocdbt["driver"] == "ocdbt" and ocdbt["base"] == {**s3_spec, "path": "run/checkpoints/20/params"}
    plain = tensorstore_utils.build_kvstore_tspec("s3://bkt/run/checkpoints/20/params", name="w", use_ocdbt=False)
    assert plain == {**s3_spec, "path": "run/checkpoints/20/params/w"}
    assert tensorstore_utils.build_kvstore_tspec("/tmp/run/checkpoints/20/params", name="w") == local_before
    assert orbax_s3.temporary_path_class("s3://bkt/run/checkpoints").__name__ == "CommitFileTemporaryPath"
    assert orbax_s3.temporary_path_class("gs://bkt/run/checkpoints") is None


def test_an_orbax_without_the_spec_builders_is_a_clear_error_before_any_save(monkeypatch):
    from orbax.checkpoint._src.serialization import tensorstore_utils

    orbax_s3.enable.cache_clear()
    monkeypatch.delattr(tensorstore_utils, "_build_non_ocdbt_kvstore_tspec")
    try:
        with pytest.raises(storage.StorageError, match="lacks _build_non_ocdbt_kvstore_tspec.*gs:// or local"):
            orbax_s3.enable()
    finally:
        orbax_s3.enable.cache_clear()
