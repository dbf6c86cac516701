"""The coordinate check of μP (docs/recipe.md §3.5; Tensor Programs V, Yang et al. 2022, App. D).

Train a model for a few Adam steps on one fixed batch and measure how far each activation moved from its
value at init, per coordinate: RMS(a_k − a_0) over all entries, for the embedding output, every block's
residual output, every layer's attention logits and the output logits. Repeat at several widths. Under a
parametrization whose hyperparameters transfer, every curve is flat in the width; under standard
parametrization with one global lr the hidden activations' changes grow with it (Adam moves each entry of
a d×d matrix by ≈ lr, so W·x moves by ≈ lr·d). A parameter put in the wrong μP group shows up as a curve
that grows or shrinks. The same measurement across depths checks depth transfer.

`minicpm-jax coord-check` runs the sweeps and plots them; tests/test_parametrization.py asserts them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax import optim, storage
from minicpm_jax.config import ModelConfig
from minicpm_jax.files import write_json
from minicpm_jax.model import MiniCPM
from minicpm_jax.science import shapes
from minicpm_jax.train.step import make_train_step

log = logging.getLogger(__name__)

# The check's programs run for milliseconds and compile for seconds: XLA:CPU's cheapest codegen saves ~40%.
QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# What a depth sweep compares (the per-layer names differ between depths).
DEPTH_NAMES = ("embedding", "block 1", "last block", "attention logits 1", "last attention logits", "logits")


def probe_batch(vocab_size: int, batch_size: int = 4, length: int = 32, seed: int = 0) -> dict[str, jax.Array]:
    """One fixed batch of random tokens for `lm_loss` (one document per row), the same at every width."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, (batch_size, length + 1)), jnp.int32)
    ones = jnp.ones((batch_size, length), jnp.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones, "loss_mask": ones,
            "positions": jnp.broadcast_to(jnp.arange(length), (batch_size, length))}


def coordinate_names(num_layers: int) -> list[str]:
    """The measured activations of a model with num_layers blocks, in plotting order."""
    return (["embedding"] + [f"block {i}" for i in range(1, num_layers + 1)]
            + [f"attention logits {i}" for i in range(1, num_layers + 1)] + ["logits"])


def _named(activations: dict[str, jax.Array]) -> dict[str, jax.Array]:
    named = {"embedding": activations["embedding"], "logits": activations["logits"]}
    for i, (residual, scores) in enumerate(zip(activations["residual"], activations["attention_logits"]), 1):
        named[f"block {i}"], named[f"attention logits {i}"] = residual, scores
    return named


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def activation_changes(cfg: ModelConfig, batch: dict[str, jax.Array], steps: int = 5, lr: float = 0.01,
                       seeds: Sequence[int] = (0,)) -> dict[str, float]:
    """RMS per coordinate of each activation's change after `steps` Adam steps at base lr `lr` on `batch`,
    averaged over the init seeds.

    The optimizer is the project's (μP lr multipliers per group, `optim.make_optimizer`) without weight decay
    or clipping, at a constant lr, so that only the parametrization differs between models. Init, the steps
    and both probes are one program, compiled once for all seeds: compiling dominates the cost at these sizes.
    """
    cfg = dataclasses.replace(cfg, remat_policy="none")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0))))
    tx = optim.make_optimizer({"weight_decay": 0.0, "clip_grad_norm": None}, optim.constant_schedule(lr),
                              nnx.to_pure_dict(abstract), cfg)
    train_step = make_train_step(graphdef, tx)

    @functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
    def run(key, batch):
        params = nnx.to_pure_dict(nnx.split(MiniCPM(cfg, rngs=nnx.Rngs(params=key)))[1])
        trained, _ = jax.lax.fori_loop(0, steps, lambda _, s: train_step(*s, batch)[:2], (params, tx.init(params)))
        # Both probes as one vmapped forward over [init, trained]: one copy of the probe to compile.
        both = jax.tree.map(lambda *p: jnp.stack(p), params, trained)
        probed = jax.vmap(lambda p: _named(nnx.merge(graphdef, p).activations(batch["tokens"])))(both)
        return {name: _rms(value[1] - value[0]) for name, value in probed.items()}

    per_seed = [run(jax.random.key(seed), batch) for seed in seeds]
    return {name: float(np.mean([changes[name] for changes in per_seed])) for name in per_seed[0]}


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One curve family: the change of every activation at each value of the swept axis (width or depth)."""

    axis: str  # "width" | "depth"
    values: list[int]
    changes: list[dict[str, float]]  # one per value
    names: list[str]  # the activations to compare and plot (every point has them)

    def curve(self, name: str) -> np.ndarray:
        return np.array([c[name] for c in self.changes])

    def spread(self, name: str) -> float:
        """max/min of one activation's change across the sweep (1 = perfectly flat)."""
        curve = self.curve(name)
        return float(curve.max() / curve.min())

    def growth(self, name: str) -> float:
        """The change at the last value over the change at the first (> 1: grows along the axis)."""
        curve = self.curve(name)
        return float(curve[-1] / curve[0])

    def worst_spread(self) -> float:
        return max(self.spread(n) for n in self.names)

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "values": self.values, "changes": self.changes,
                "spread": {n: self.spread(n) for n in self.names}, "growth": {n: self.growth(n) for n in self.names}}


def width_sweep(base: ModelConfig, widths: Sequence[int], **kwargs: Any) -> Sweep:
    """The coordinate check across widths (base's depth and every other setting)."""
    batch = probe_batch(base.vocab_size)
    changes = []
    for width in widths:
        log.info("coord-check: %s, width %d", base.parametrization, width)
        cfg = dataclasses.replace(base, **shapes.width_settings(base, width))  # same head_dim, GQA, d_ff/d
        changes.append(activation_changes(cfg, batch, **kwargs))
    return Sweep("width", list(widths), changes, coordinate_names(base.num_layers))


def depth_sweep(base: ModelConfig, depths: Sequence[int], **kwargs: Any) -> Sweep:
    """The coordinate check across depths at base's width; `last ...` names the deepest layer's activations."""
    batch = probe_batch(base.vocab_size)
    changes = []
    for depth in depths:
        log.info("coord-check: %s, depth %d, num_layers_base %d", base.parametrization, depth, base.num_layers_base)
        point = activation_changes(dataclasses.replace(base, num_layers=depth), batch, **kwargs)
        changes.append({**point, "last block": point[f"block {depth}"],
                        "last attention logits": point[f"attention logits {depth}"]})
    return Sweep("depth", list(depths), changes, list(DEPTH_NAMES))


def coord_check(base: ModelConfig, out_dir: str, widths: Sequence[int] = (64, 128, 256, 512),
                depths: Sequence[int] = (2, 4, 8, 16), parametrizations: Sequence[str] = ("mup", "standard_fanin"),
                num_layers: int = 2, depth_base: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Every sweep of `minicpm-jax coord-check`: widths (at num_layers blocks) for each parametrization with a
    tied and an untied head; depths (at base's width, μP with base's head) without and with the depth-μP lr
    rule (num_layers_base = depth_base; 0 leaves it out). Writes coord_check.json and the two PNGs."""
    from minicpm_jax.science import plots

    sweeps: dict[str, dict[str, Sweep]] = {"width": {}, "depth": {}}
    for parametrization in parametrizations:
        for tied in (True, False):
            cfg = dataclasses.replace(base, parametrization=parametrization, tie_word_embeddings=tied,
                                      num_layers=num_layers, num_layers_base=0)
            sweeps["width"][f"{parametrization}, {'tied' if tied else 'untied'} head"] = width_sweep(cfg, widths,
                                                                                                    **kwargs)
    rules = [0, depth_base] if depth_base else [0]
    for rule in rules if depths else []:
        name = f"mup, lr x sqrt({rule}/L)" if rule else "mup (lr independent of L)"
        cfg = dataclasses.replace(base, parametrization="mup", num_layers_base=rule)
        sweeps["depth"][name] = depth_sweep(cfg, depths, **kwargs)
    report = {"settings": {"widths": list(widths), "depths": list(depths), "num_layers": num_layers,
                           "depth_width": base.hidden_size, "dim_model_base": base.dim_model_base, **kwargs},
              **{axis: {name: sweep.to_dict() for name, sweep in by_name.items()} for axis, by_name in sweeps.items()}}
    write_json(storage.join(out_dir, "coord_check.json"), report, indent=1)
    plots.plot_coord_check(sweeps["width"], storage.join(out_dir, "coord_check.png"), columns=len(parametrizations))
    if sweeps["depth"]:
        plots.plot_coord_check(sweeps["depth"], storage.join(out_dir, "coord_check_depth.png"),
                               columns=len(sweeps["depth"]))
    return report


def format_report(report: dict[str, Any]) -> str:
    """One line per sweep: the worst spread (max/min over the axis) and each activation's growth."""
    lines = []
    for axis in ("width", "depth"):
        for name, sweep in report[axis].items():
            growth = ", ".join(f"{n} {g:.2f}x" for n, g in sweep["growth"].items())
            lines.append(f"{axis} {sweep['values']}, {name}: worst max/min {max(sweep['spread'].values()):.2f}; "
                         f"last/first: {growth}")
    return "\n".join(lines)


def flat(sweep: Sweep, tolerance: float = 1.5) -> bool:
    """Whether every activation's change stays within `tolerance`x across the sweep (the μP criterion)."""
    return sweep.worst_spread() <= tolerance and all(math.isfinite(v) for c in sweep.changes for v in c.values())
