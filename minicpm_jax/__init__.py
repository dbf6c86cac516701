"""minicpm-jax: MiniCPM in JAX/Flax NNX.

Public API (kept stable; see DESIGN.md section 3)::

        import minicpm_jax as mj
        cfg = mj.config.load("configs/demo.py", overrides=["model.num_layers=4"])
        model = mj.MiniCPM(cfg.model, rngs=nnx.Rngs(0))
        logits = model(tokens)
"""

from minicpm_jax import config
from minicpm_jax.model.transformer import MiniCPM

__version__ = "0.1.0"


def __getattr__(name):
    # hf pulls in safetensors and file IO; import it on first use so `import minicpm_jax` stays light.
    if name == "hf":
        import importlib

        return importlib.import_module("minicpm_jax.hf")
    raise AttributeError(f"module 'minicpm_jax' has no attribute {name!r}")


__all__ = ["MiniCPM", "config", "hf"]
