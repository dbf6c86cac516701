"""The one filesystem layer: every file a run, an export, an import or a prepared dataset reads or writes.

A path is a local path or a URL of object storage (`gs://bucket/...`, `s3://bucket/...`); the same calls serve
both, through etils.epath (Orbax's own path library), which reaches object storage through fsspec: gcsfs for
gs://, s3fs for s3:// (the `gcs` and `s3` extras; imported by fsspec only when such a path is used). Orbax
writes the checkpoints themselves through tensorstore, which speaks to gs:// and s3:// natively (Orbax builds
gs:// kvstores itself; run/orbax_s3.py teaches it s3://).

Writes are atomic: a reader sees the old file or the new one, never half of one.
- Locally a file is written to a temporary name in its folder, then renamed over the target (os.replace).
- On object storage a file is one object, uploaded in one request (or one resumable upload finalised at the
  end); GCS and S3 make an object visible only once its upload has completed, so the upload is atomic as it
  is, and a rename (a copy and a delete there) would add nothing.

Object storage has no folders (a file's folder exists once a file is in it) and cannot append: `TextLog`
rewrites its object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from typing import Iterator

from etils import epath

_BACKENDS = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}  # scheme: (the fsspec module it needs, the extra)


def _import_backend(module: str) -> None:
    """Imports an fsspec backend and turns fsspec's folder-listing cache off (fsspec comes with the backend:
    a local-only install has neither). A run directory is shared by every host of a job, and Orbax's
    tensorstore writes bypass fsspec: a cached listing would hide another writer's files (a step committed
    by process 0, a shard another host uploaded). Every listing asks the store."""
    __import__(module)
    import fsspec

    for protocol in ("gcs", "s3"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


class StorageError(OSError):
    """A path cannot be reached: an object-storage URL without its backend installed, a bad URL."""


def scheme(path: str | os.PathLike) -> str:
    """"gs", "s3", ... for a URL; "" for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else ""


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) != ""


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path for `path`, after checking that its scheme's backend is installed (an error naming it)."""
    name = scheme(path)
    if name:
        if name not in _BACKENDS:
            raise StorageError(f"{path}: unsupported URL scheme {name}:// (supported: "
                               f"{', '.join(s + '://' for s in _BACKENDS)} and local paths)")
        module, extra = _BACKENDS[name]
        try:
            _import_backend(module)
        except ImportError as error:
            raise StorageError(f"{path}: {name}:// paths need {module}: pip install 'minicpm-jax[{extra}]'") from error
    return epath.Path(path)


def absolute(path: str | os.PathLike) -> str:
    """A location that means the same from any working directory: a URL as it is, a local path made absolute."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(text)


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base`/`parts` as a string (a URL stays a URL)."""
    return os.fspath(as_path(base).joinpath(*parts))


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists()


def is_file(path: str | os.PathLike) -> bool:
    return as_path(path).is_file()


def is_dir(path: str | os.PathLike) -> bool:
    return as_path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in a folder (sorted); [] for a folder that does not exist."""
    folder = as_path(path)
    return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []


def remove(path: str | os.PathLike) -> None:
    as_path(path).unlink()


def remove_tree(path: str | os.PathLike) -> None:
    """Deletes a folder and everything in it (on a bucket: every object under the prefix)."""
    as_path(path).rmtree()


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: str | os.PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


@contextlib.contextmanager
def _replaced_atomically(target: epath.Path) -> Iterator[str]:
    """A temporary local path next to `target`, renamed over it when the block succeeds (deleted if it fails)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: processes writing the same file at once must not write into one temporary file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see the module docstring), creating its folder."""
    target = as_path(path)
    if is_remote(path):
        target.write_bytes(data)  # one object, visible only once uploaded whole
        return
    with _replaced_atomically(target) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies one file, either side local or remote, in 8 MiB pieces (a shard never has to fit in memory);
    atomic at `target` like `write_bytes`."""
    if is_remote(target):
        _stream(source, target)
        return
    with _replaced_atomically(as_path(target)) as tmp:
        _stream(source, tmp)


def _stream(source: str | os.PathLike, target: str | os.PathLike) -> None:
    with as_path(source).open("rb") as src, as_path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> str:
    """Where `stage` keeps local copies: $MINICPM_JAX_CACHE, else ~/.cache/minicpm-jax."""
    return os.environ.get("MINICPM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicpm-jax")


def stage(path: str | os.PathLike, expected_sha256: str | None = None) -> str:
    """A local path holding the bytes of `path`: itself when local, else a copy in `cache_dir()`/staged.

    For readers that open files by name in C++ (ArrayRecord, through Grain), which cannot read object storage.
    A copy is made once per content: named by `expected_sha256` when given (checked after the download, so a
    cached copy is always a verified one), else by the URL, and then reused while its size matches the object's.
    Each process stages its own copy; downloads are atomic, so processes sharing a cache never see half a file.
    """
    if not is_remote(path):
        return os.fspath(path)
    url = os.fspath(path)
    name = expected_sha256 or hashlib.sha256(url.encode()).hexdigest()
    local = os.path.join(cache_dir(), "staged", name[:2], f"{name}-{os.path.basename(url)}")
    remote_size = as_path(url).stat().length
    if os.path.isfile(local) and os.path.getsize(local) == remote_size:
        return local
    with _replaced_atomically(epath.Path(local)) as tmp:
        _stream(url, tmp)
        actual = sha256(tmp) if expected_sha256 else None
        if actual != expected_sha256:
            raise StorageError(f"{url}: its sha256 {actual} is not the {expected_sha256} its manifest records "
                               f"(the file changed after it was prepared)")
    return local


class TextLog:
    """A text file that grows by lines (metrics.jsonl): appended in place locally, rewritten on object storage.

    Object storage cannot append, so there the whole file is uploaded again, at most every `upload_seconds`
    (each upload is atomic) and at every `flush`: a writer that is killed loses at most the lines since its
    last flush, and a reader never sees a torn line.
    """

    def __init__(self, path: str | os.PathLike, upload_seconds: float = 30.0):
        self.path = os.fspath(path)
        self.remote = is_remote(self.path)
        self.upload_seconds = upload_seconds
        self.lines = read_text(self.path).splitlines(keepends=True) if exists(self.path) else []
        self._unwritten: list[str] = []
        self._written_at = time.monotonic()

    def replace(self, lines: list[str]) -> None:
        """Rewrites the file as `lines` (each ending in a newline), atomically."""
        self.lines, self._unwritten = list(lines), []
        write_text(self.path, "".join(self.lines))
        self._written_at = time.monotonic()

    def append(self, line: str) -> None:
        self.lines.append(line)
        self._unwritten.append(line)
        if not self.remote or time.monotonic() - self._written_at >= self.upload_seconds:
            self.flush()

    def flush(self) -> None:
        """Makes every appended line durable."""
        if not self._unwritten:
            return
        if self.remote:
            self.replace(self.lines)
            return
        as_path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(self._unwritten))
        self._unwritten = []
