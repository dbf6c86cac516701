"""`make demo`: the conversion path end to end, checked against transformers.

Builds the demo model, exports it in both HF layouts, reloads the Granite export with transformers'
native `AutoModelForCausalLM` and the MiniCPM export with our own loader, and reports how closely
the logits agree. Needs the `[convert]` extra (torch, transformers).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax import config as config_lib
from minicpm_jax import hf
from minicpm_jax.model import MiniCPM, count_params

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # relative max error allowed between our logits and transformers' (float32)


def relative_max_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def run_hf_roundtrip_demo(config_path: str, overrides: Sequence[str], out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config_lib.load(config_path, overrides)
    log.info("building %s: %s non-embedding parameters", config_path, f"{count_params(cfg.model):,}")
    model = MiniCPM(cfg.model, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(2, 64), dtype=np.int32)
    ours = np.asarray(model(jnp.asarray(tokens)))

    granite_dir, minicpm_dir = os.path.join(out, "granite"), os.path.join(out, "minicpm")
    hf.save_hf(model, None, granite_dir, arch="granite", overwrite=True)
    hf.save_hf(model, None, minicpm_dir, arch="minicpm", overwrite=True)
    log.info("exported to %s (Granite layout) and %s (MiniCPM layout)", granite_dir, minicpm_dir)

    torch_model = AutoModelForCausalLM.from_pretrained(granite_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    error = relative_max_error(ours, reference)
    log.info("transformers %s vs minicpm-jax logits: relative max error %.2e", type(torch_model).__name__, error)

    reloaded, _ = hf.load_hf(minicpm_dir)
    bitwise = np.array_equal(np.asarray(reloaded(jnp.asarray(tokens))), ours)
    log.info("MiniCPM-layout export reloaded by minicpm-jax: logits bitwise equal = %s", bitwise)
    if error > TOLERANCE or not bitwise:
        raise RuntimeError(f"demo failed: relative error {error:.2e} (tolerance {TOLERANCE}), bitwise={bitwise}")
    print(f"OK: the logits agree (transformers relative max error {error:.2e} <= {TOLERANCE}; "
          f"MiniCPM-layout round trip bitwise equal)")
