"""minicpm-jax: MiniCPM in JAX/Flax NNX.

Public API (kept stable)::

    import minicpm_jax as mj
    cfg = mj.config.load("configs/demo.py", overrides=["model.num_layers=4"])
    model = mj.MiniCPM(cfg.model, rngs=nnx.Rngs(0))
    logits = model(tokens)
    model, model_cfg = mj.hf.load_hf("hf_folder"); mj.hf.save_hf(model, model_cfg, "out")
    schedule = mj.optim.wsd_schedule(peak_lr=1e-2, warmup_steps=10, stable_steps=80, decay_steps=10)

The packages, in the order a run uses them: config.py (every config section), data/, model/, optim/,
parallel/ (meshes, multi-host, memory, TPU compiles), run/ (run directories, checkpoints, derived runs),
train/, eval/, infer/, hf/, align/ (SFT, DPO), science/ (μP, scaling laws), cli/ (the `minicpm-jax` command).
"""

import importlib

from minicpm_jax import config

__version__ = "0.1.0"

# Imported on first use: jax and flax take seconds to import, and light users of the package (Grain
# data workers, `minicpm-jax --help`) should not pay for them.
_LAZY = {"MiniCPM": ("minicpm_jax.model.transformer", "MiniCPM"), "hf": ("minicpm_jax.hf", None),
         "optim": ("minicpm_jax.optim", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'minicpm_jax' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


__all__ = ["MiniCPM", "config", "hf", "optim"]
