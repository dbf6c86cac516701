"""minicpm-jax: MiniCPM in JAX/Flax NNX.

Public API (kept stable; see DESIGN.md section 3)::

    import minicpm_jax as mj
    cfg = mj.config.load("configs/demo.py", overrides=["model.num_layers=4"])
    model = mj.MiniCPM(cfg.model, rngs=nnx.Rngs(0))
    logits = model(tokens)
"""

import importlib

from minicpm_jax import config

__version__ = "0.1.0"

# Imported on first use: jax and flax take seconds to import, and light users of the package (Grain
# data workers, `minicpm-jax --help`) should not pay for them.
_LAZY = {"MiniCPM": ("minicpm_jax.model.transformer", "MiniCPM"), "hf": ("minicpm_jax.hf", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'minicpm_jax' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


__all__ = ["MiniCPM", "config", "hf"]
