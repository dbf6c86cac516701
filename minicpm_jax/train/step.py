"""One training step: the objectives, the jitted train and eval steps, and the Task a run optimises."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minicpm_jax.data.feed import DataFeed, Feed
from minicpm_jax.data.pipeline import BATCH_KEYS
from minicpm_jax.model import causal_lm_loss
from minicpm_jax.run.plan import Plan, StepLayout

# (graphdef, params, micro-batch, *frozen) -> (objective summed over the micro-batch, stats). stats["count"] is
# the normaliser (tokens for language modelling, pairs for preference losses): the summed objective and its
# gradients are divided by the batch's total count, and so is every other stat (each a sum) when reported.
# `frozen` are the task's inputs that training never updates (a DPO reference model's parameters).
LossFn = Callable[[nnx.GraphDef, Any, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def lm_loss(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-summed cross-entropy of a packed batch, plus the MoE router losses of an MoE model.

    The router losses are means over tokens, so each enters the summed objective weighted by the token
    count; `loss` stays the pure LM loss, which is what per-byte metrics and evaluations report.
    """
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                        return_aux=True)
    mean, count = causal_lm_loss(logits, batch["targets"], batch["loss_mask"])
    objective = mean * count
    stats = {"count": count, "loss": objective}
    for name, coefficient in model.config.router_loss_coefficients().items():
        objective = objective + coefficient * aux[name] * count
    stats.update({f"moe_{name}": value * count for name, value in aux.items()})
    return objective, stats


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    layout: StepLayout | None = None, loss_fn: LossFn = lm_loss,
                    batch_keys: tuple[str, ...] = BATCH_KEYS, frozen_shardings: tuple = ()) -> Callable:
    """(params, opt_state, batch, *frozen) -> (params, opt_state, metrics), jitted; params and opt_state are donated.

    params is the model's pure-dict state (`nnx.to_pure_dict`), batch a dict of arrays with a leading
    batch axis (for `lm_loss`: [B, T] int32 tokens, targets, segment_ids, positions, loss_mask). With
    grad_accum_steps = k the batch is split into k micro-batches whose summed objectives, stats and
    gradients are accumulated in a scan, then divided by the total count: the update equals that of
    the whole batch at once, in 1/k of the activation memory. metrics holds every stat of `loss_fn`
    divided by the count, the count itself and the gradient norm. `layout` pins inputs and outputs to
    their mesh shardings, `frozen_shardings` those of the frozen inputs (never donated, never differentiated).
    """
    accum = grad_accum_steps
    grad_fn = jax.value_and_grad(lambda params, micro, *frozen: loss_fn(graphdef, params, micro, *frozen),
                                 has_aux=True)

    def train_step(params, opt_state, batch, *frozen):
        # Strided split: micro-batch i takes rows i, i+k, ...; each device keeps its own rows in every micro-batch.
        micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(totals, micro):
            (_, stats), grads = grad_fn(params, micro, *frozen)
            return jax.tree.map(jnp.add, totals, (stats, grads)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first, *frozen))
        (stats, grads), _ = jax.lax.scan(accumulate, (zeros[0][1], zeros[1]), micro_batches)
        count = jnp.maximum(stats["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {name: value / count for name, value in stats.items() if name != "count"}
        return params, opt_state, {**metrics, "count": stats["count"], "grad_norm": optax.tree.norm(grads)}

    if layout is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    batch_layout = {key: layout.batch for key in batch_keys}
    return jax.jit(train_step, donate_argnums=(0, 1),
                   in_shardings=(layout.params, layout.opt_state, batch_layout, *frozen_shardings),
                   out_shardings=(layout.params, layout.opt_state, layout.replicated))


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn = lm_loss) -> Callable:
    """(params, batch) -> (summed loss, count), jitted."""

    def eval_step(params, batch):
        _, stats = loss_fn(graphdef, params, batch)
        return stats["loss"], stats["count"]

    return jax.jit(eval_step)


@dataclasses.dataclass(frozen=True)
class Task:
    """What a run optimises: its loss, the batch keys it reads, its data feed and its frozen inputs.

    The default is language modelling on `data.mixtures` (pre-training, and SFT on chat data, whose loss
    masks come with the batches). Alignment objectives (align/dpo.py) bring their own loss and feed; the
    loop, checkpoints, resume and metrics stay the same.
    """

    loss_fn: LossFn = lm_loss
    batch_keys: tuple[str, ...] = BATCH_KEYS
    # (plan, workdir) -> the feed: restore(step, state), next_batch(step), state(), bytes_per_token(), close()
    make_feed: Callable[[Plan, str], Feed] = lambda plan, workdir: DataFeed(
        plan.data, plan.phase_of_step, plan.train.seq_len, plan.train.global_batch_size)
    # (plan, workdir) -> extra train-step arguments that are never updated (e.g. reference parameters)
    frozen: Callable[[Plan, str], tuple] = lambda plan, workdir: ()
