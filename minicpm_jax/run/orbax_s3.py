"""Orbax checkpoints in s3:// buckets (gs:// needs nothing of this).

Orbax (0.12) builds tensorstore's kvstore specs for local paths and gs:// only: an s3:// directory fails its
"checkpoint path should be absolute" check (os.path.normpath turns s3://b into s3:/b). Tensorstore itself has
an s3 kvstore driver, so `enable` teaches Orbax's two spec builders the s3:// scheme: a spec is built for the
same bucket and key as gs://, and each gcs kvstore in it becomes an s3 one. Tensorstore's s3 driver takes its
credentials from the usual AWS variables and files, but its endpoint and region only from the spec, never from
the environment; `kvstore_spec` puts AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and AWS_REGION /
AWS_DEFAULT_REGION there (as botocore, and so s3fs and boto3, read them), so one environment points every
client at the same S3-compatible store (MinIO, Cloudflare R2, a test emulator). Without an endpoint tensorstore
finds the bucket's AWS region itself.

A rename is a copy on S3, so `temporary_path_class` gives the step directories of an s3:// run the
commit-file protocol Orbax uses on GCS: a step is written in place and counts once its commit_success.txt is.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from minicpm_jax import storage

_PLACEHOLDER = "gs://"  # Orbax builds a gs:// spec; its gcs kvstores are then made s3 ones


def endpoint() -> str | None:
    """The S3 endpoint URL that botocore would use, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def kvstore_spec(bucket: str, path: str) -> dict[str, Any]:
    """Tensorstore's s3 kvstore for s3://bucket/path, at this environment's endpoint and region."""
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": path}
    if endpoint():
        spec["endpoint"] = endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def _as_s3(spec: Any) -> Any:
    if isinstance(spec, dict):
        if spec.get("driver") in ("gcs", "gcs_grpc"):
            return {**{k: v for k, v in spec.items() if k not in ("driver", "bucket", "path")},
                    **kvstore_spec(spec["bucket"], spec.get("path", ""))}
        return {key: _as_s3(value) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_as_s3(item) for item in spec]
    if isinstance(spec, str) and spec.startswith(_PLACEHOLDER):
        raise storage.StorageError(f"Orbax built a kvstore URL {spec!r} for an s3:// checkpoint; "
                                   "minicpm_jax/run/orbax_s3.py does not know this Orbax version's specs")
    return spec


def _for_s3(builder):
    @functools.wraps(builder)
    def build(directory, *args, **kwargs):
        text = os.fspath(directory)
        if not text.startswith("s3://"):
            return builder(directory, *args, **kwargs)
        return _as_s3(builder(_PLACEHOLDER + text[len("s3://"):], *args, **kwargs))

    build.minicpm_s3 = True
    return build


@functools.cache
def enable() -> None:
    """Lets Orbax write and read checkpoints at s3:// paths (idempotent; local and gs:// paths are untouched)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    names = ("_build_ocdbt_kvstore_tspec", "_build_non_ocdbt_kvstore_tspec")
    missing = [name for name in names if not callable(getattr(tensorstore_utils, name, None))]
    if missing:
        import orbax.checkpoint

        raise storage.StorageError(
            f"s3:// checkpoints: orbax-checkpoint {getattr(orbax.checkpoint, '__version__', '?')} lacks "
            f"{', '.join(missing)}, which minicpm_jax/run/orbax_s3.py extends to s3://; use a gs:// or local "
            "run directory, or orbax-checkpoint 0.12")
    for name in names:
        builder = getattr(tensorstore_utils, name)
        if not getattr(builder, "minicpm_s3", False):
            setattr(tensorstore_utils, name, _for_s3(builder))


def temporary_path_class(directory: str):
    """The Orbax TemporaryPath class for checkpoints under `directory`: commit files on s3://, else Orbax's
    default (None)."""
    if storage.scheme(directory) != "s3":
        return None
    from orbax.checkpoint._src.path import atomicity

    return atomicity.CommitFileTemporaryPath
