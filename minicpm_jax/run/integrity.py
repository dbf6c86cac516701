"""What a checkpoint's meta records at save so that a restore can tell damaged state from good state.

Orbax restores whatever bytes it finds: one flipped bit in a parameter shard reads back as a slightly
different weight, and training would go on from it. So at every save `seal` adds to the meta item
- a checksum of every array of `params` and `opt_state`: the sum over its elements of each element's bits
  times an odd weight that depends on the element's position, modulo 2^32. Any single flipped bit changes
  it (a flip adds ±2^k · odd, never 0 mod 2^32), as does moving values between positions; it is computed
  on the devices, over the global arrays, so any mesh and any number of processes give the same number;
- the sha256 of each process's data-iterator state;
- the sha256 of the meta itself (everything above included), so a damaged meta is caught too.

`open_seal` checks the meta's own digest; `first_mismatch` compares recomputed checksums with the sealed
ones. A checkpoint saved before checksums existed has none and is restored unverified.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

_GOLDEN = 0x9E3779B1  # odd; (2·index + 1) · _GOLDEN is odd for every index
_DIGEST_KEY, _CHECKSUMS_KEY = "digest", "checksums"


class IntegrityError(ValueError):
    """A checkpoint item whose content is not what was saved."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (8-byte values as two words, narrower ones zero-extended)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    # The flat position of each word, from per-dimension iotas (wrapping mod 2^32 past 4G words, which
    # keeps every weight odd).
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weights = (position * np.uint32(2) + np.uint32(1)) * np.uint32(_GOLDEN)
    return jnp.sum(words * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def array_checksums(tree: Any) -> dict[str, int]:
    """{'/'-joined path: checksum} of every array of `tree` (collective: every process calls it)."""
    sums = jax.device_get(_checksums(tree))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): int(value)
            for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def data_digest(data_state: Any) -> str:
    """The sha256 of one process's data-iterator state."""
    return hashlib.sha256(_canonical(data_state)).hexdigest()


def data_digests(data_state: Any) -> list[str]:
    """`data_digest` of every process's data state, in process order (collective: every process calls it)."""
    digest = np.frombuffer(bytes.fromhex(data_digest(data_state)), np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1, digest.size)
    return [bytes(row).hex() for row in gathered.astype(np.uint8)]


def seal(meta: dict[str, Any], checksums: dict[str, Any]) -> dict[str, Any]:
    """`meta` with the item checksums and, over both, its own digest."""
    sealed = {**meta, _CHECKSUMS_KEY: checksums}
    return {**sealed, _DIGEST_KEY: hashlib.sha256(_canonical(sealed)).hexdigest()}


def open_seal(sealed: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(meta, checksums) of a sealed meta (checksums None for an unsealed, older one); raises
    IntegrityError when the meta is not the one saved."""
    if _DIGEST_KEY not in sealed and _CHECKSUMS_KEY not in sealed:
        return sealed, None
    if _DIGEST_KEY not in sealed or _CHECKSUMS_KEY not in sealed:  # a damaged key name
        raise IntegrityError(f"{where} fails verification: it has checksums without a digest, or a digest without "
                             f"checksums (it was changed or damaged after the save)")
    body = {key: value for key, value in sealed.items() if key != _DIGEST_KEY}
    if hashlib.sha256(_canonical(body)).hexdigest() != sealed[_DIGEST_KEY]:
        raise IntegrityError(f"{where} fails verification: it does not match the digest recorded with it (it was "
                             f"changed or damaged after the save)")
    checksums = body.pop(_CHECKSUMS_KEY)
    return body, checksums


def first_mismatch(expected: dict[str, int], actual: dict[str, int]) -> str | None:
    """The first array whose checksum differs from the sealed one (or that is missing or new), or None."""
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            if name not in actual:
                return f"{name} is missing"
            if name not in expected:
                return f"{name} was not in the saved checkpoint"
            return f"{name} has checksum {actual[name]:#010x}, saved as {expected[name]:#010x}"
    return None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
