"""Direct preference optimisation (MiniCPM-DPO, docs/recipe.md §7.4) against a frozen reference model.

For a prompt x with chosen response y_w and rejected response y_l, let
    h = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
where log π(y|x) sums the log-probabilities of the response tokens (and their EOS) only. Losses:
    sigmoid  −(1 − ε) · log σ(h) − ε · log σ(−h)      (Rafailov et al.; ε > 0 is conservative DPO)
    ipo      (h/β − 1/(2β))²                          (Azar et al., on summed log-probabilities)
Logged, averaged over pairs: the loss, the implicit rewards β(log π − log π_ref) of chosen and
rejected, their margin and the fraction of pairs whose chosen reward is higher (accuracy).

The reference is the run's starting point (`init.run` at `init.step`), never updated. Its log-probs
are either computed once before training and cached in `RUN/reference_logps.npz` (then they are two
more batch keys), or computed on the fly from its parameters, a non-donated train-step argument
(`dpo.reference = "online"`: no cache, one more forward pass per step).

Pairs come from a folder prepared with `prepare-data --format pairs`. Each is padded to train.seq_len
(longer pairs are truncated). The pair order is a seeded permutation per epoch, so the batch of a step
follows from the step alone: resuming needs no data state and is exact.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from minicpm_jax import storage
from minicpm_jax.config import ConfigError, DPOConfig, MeshConfig, parse_mixture, typed_section
from minicpm_jax.data import records
from minicpm_jax.parallel import mesh as sharding
from minicpm_jax.run import checkpoint
from minicpm_jax.run.plan import Plan
from minicpm_jax.train.step import Task

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
SEQUENCE_KEYS = tuple(f"{side}_{part}" for side in SIDES for part in ("tokens", "targets", "mask"))
REFERENCE_KEYS = tuple(f"ref_{side}_logps" for side in SIDES)
CACHE_FILE = "reference_logps.npz"


def dpo_config(cfg: ml_collections.ConfigDict) -> DPOConfig:
    return typed_section(DPOConfig, cfg.get("dpo"), "dpo")


# ----------------------------------------------------------------------------------------------- the loss

def sequence_logps(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array, targets: jax.Array,
                   mask: jax.Array) -> jax.Array:
    """[N] summed log-probabilities (float32) of `targets` where `mask` is 1, for [N, T] rows.

    Rows are padded at the end, so causal attention keeps padding out of every real position.
    """
    logits = nnx.merge(graphdef, params)(tokens).astype(jnp.float32)
    token_logps = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return (token_logps * mask).sum(axis=-1)


def preference_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
                    ref_rejected: jax.Array, dpo: DPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(summed loss, summed stats) over pairs, from the four [N] log-prob sums (see the module docstring)."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = dpo.beta * (chosen_ratio - rejected_ratio)
    if dpo.loss == "ipo":
        losses = (h / dpo.beta - 1 / (2 * dpo.beta)) ** 2
    else:
        eps = dpo.label_smoothing
        losses = -(1 - eps) * jax.nn.log_sigmoid(h) - eps * jax.nn.log_sigmoid(-h)
    chosen_reward, rejected_reward = dpo.beta * chosen_ratio, dpo.beta * rejected_ratio
    stats = {"count": jnp.asarray(losses.shape[0], jnp.float32), "loss": losses.sum(),
             "rewards_chosen": chosen_reward.sum(), "rewards_rejected": rejected_reward.sum(),
             "reward_margin": (chosen_reward - rejected_reward).sum(),
             "reward_accuracy": (chosen_reward > rejected_reward).astype(jnp.float32).sum()}
    return stats["loss"], stats


def _both_sides_logps(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected log-prob sums from one forward pass over both halves."""
    stacked = [jnp.concatenate([batch[f"chosen_{part}"], batch[f"rejected_{part}"]])
               for part in ("tokens", "targets", "mask")]
    logps = sequence_logps(graphdef, params, *stacked)
    return tuple(jnp.split(logps, 2))


def make_dpo_loss(dpo: DPOConfig):
    """The train loop's loss_fn: (graphdef, params, batch[, reference params]) -> (summed loss, stats)."""

    def loss_fn(graphdef, params, batch, *reference_params):
        chosen, rejected = _both_sides_logps(graphdef, params, batch)
        if reference_params:
            ref_chosen, ref_rejected = jax.lax.stop_gradient(_both_sides_logps(graphdef, reference_params[0], batch))
        else:
            ref_chosen, ref_rejected = (batch[key][:, 0] for key in REFERENCE_KEYS)
        return preference_loss(chosen, rejected, ref_chosen, ref_rejected, dpo)

    return loss_fn


# ----------------------------------------------------------------------------------------------- the data

def read_pairs(prepared_dir: str, seq_len: int) -> dict[str, np.ndarray]:
    """Every pair of a `--format pairs` folder as [N, seq_len] int32 arrays (SEQUENCE_KEYS), end-padded.

    A sequence longer than seq_len + 1 tokens is truncated; a pair left without a response token on a
    side is dropped (both logged).
    """
    manifest, shards = records.open_shards(prepared_dir)
    fields = manifest.get("record_fields")
    if manifest.get("input_format") != "pairs":
        raise ValueError(f"{prepared_dir} holds {manifest.get('input_format', 'text')} data, not preference pairs "
                         f"(prepare it with `prepare-data --format pairs`)")
    rows = {key: [] for key in SEQUENCE_KEYS}
    truncated = dropped = 0
    for shard in shards:
        for index in range(len(shard)):
            pair = records.decode_fields(shard[index], tuple(fields))
            sides = {}
            for side in SIDES:
                ids, mask = pair[side][:seq_len + 1], pair[f"{side}_mask"][:seq_len + 1]
                truncated += len(pair[side]) > seq_len + 1
                sides[side] = (ids, mask)
            if any(not mask[1:].any() for _, mask in sides.values()):
                dropped += 1
                continue
            for side, (ids, mask) in sides.items():
                pad = seq_len + 1 - len(ids)
                ids, mask = np.pad(ids, (0, pad)), np.pad(mask, (0, pad))
                rows[f"{side}_tokens"].append(ids[:-1])
                rows[f"{side}_targets"].append(ids[1:])
                rows[f"{side}_mask"].append(mask[1:])
    if truncated or dropped:
        log.warning("%s: %d sequences truncated to train.seq_len=%d tokens; %d pairs dropped for lack of a response "
                    "token", prepared_dir, truncated, seq_len, dropped)
    if not rows["chosen_tokens"]:
        raise ValueError(f"{prepared_dir}: no preference pair fits train.seq_len={seq_len}")
    return {key: np.stack(value).astype(np.int32) for key, value in rows.items()}


def steps_for_epochs(num_pairs: int, global_batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(num_pairs * epochs / global_batch_size))


class PairFeed:
    """Batches of pairs for the train loop (a data.feed.Feed); the batch of step s is rows s·B .. s·B + B of the
    pair stream.

    The stream is a seeded permutation of all pairs per epoch, one epoch after another, so a step's batch
    needs no iterator state. Each process takes its own rows of the global batch.
    """

    def __init__(self, pairs: dict[str, np.ndarray], global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.pairs = pairs
        self.num_pairs = len(next(iter(pairs.values())))
        self.seed = seed
        self._global = global_batch_size
        local = global_batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)

    def indices(self, step: int) -> np.ndarray:
        """Pair indices of the global batch of `step`."""
        positions = np.arange(step * self._global, (step + 1) * self._global)
        epochs, offsets = np.divmod(positions, self.num_pairs)
        orders = {e: np.random.default_rng([self.seed, int(e)]).permutation(self.num_pairs) for e in set(epochs)}
        return np.array([orders[e][o] for e, o in zip(epochs, offsets)])

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        chosen = self.indices(step)[self._rows]
        return {key: value[chosen] for key, value in self.pairs.items()}

    def restore(self, step: int, saved: dict[str, Any] | None) -> None:
        if saved and saved.get("num_pairs") != self.num_pairs:
            raise ValueError(f"the checkpoint was trained on {saved.get('num_pairs')} pairs, the data now holds "
                             f"{self.num_pairs}")

    def state(self) -> dict[str, Any]:
        return {"num_pairs": self.num_pairs, "seed": self.seed}

    def bytes_per_token(self) -> None:  # the loss is per pair, not per token
        return None

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- the reference

def pairs_dir(plan: Plan) -> str:
    mixture = plan.data.mixture("stable")
    if len(mixture) != 1 or plan.data.mixture("decay") != mixture:
        raise ConfigError(f"DPO reads one prepared folder of pairs: data.mixtures.stable, got {mixture}")
    return mixture[0][0]


def load_reference(cfg: ml_collections.ConfigDict, plan: Plan) -> Any:
    """The reference parameters (`init.run` at `init.step`), laid out on this run's mesh."""
    saved = checkpoint.RunCheckpoints(cfg.init.run, async_save=False)
    try:
        return saved.restore_params(cfg.init.step, plan.abstract_params)
    finally:
        saved.close()


def reference_logps(plan: Plan, reference: Any, pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """REFERENCE_KEYS -> [N] float32 reference log-prob sums of every pair, in global batches of the run's size."""
    batch_size = plan.train.global_batch_size
    replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    compute = jax.jit(lambda params, batch: _both_sides_logps(plan.graphdef, params, batch),
                      out_shardings=(replicated, replicated))
    num_pairs = len(pairs["chosen_tokens"])
    local = batch_size // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    out = {key: [] for key in REFERENCE_KEYS}
    for start in range(0, num_pairs, batch_size):
        index = np.arange(start, start + batch_size) % num_pairs  # the last batch wraps; the extra rows are dropped
        batch = sharding.global_batch({key: value[index][rows] for key, value in pairs.items()}, plan.mesh)
        for key, logps in zip(REFERENCE_KEYS, compute(reference, batch)):
            out[key].append(np.asarray(logps)[:min(batch_size, num_pairs - start)])
    return {key: np.concatenate(value).astype(np.float32) for key, value in out.items()}


def cached_reference_logps(cfg: ml_collections.ConfigDict, plan: Plan, workdir: str,
                           pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference log-probs from RUN/reference_logps.npz, computed and written first if absent."""
    path = storage.join(workdir, CACHE_FILE)
    source = np.asarray([storage.absolute(cfg.init.run), str(cfg.init.step)])
    if storage.is_file(path):
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as cache:
            stale = cache[REFERENCE_KEYS[0]].shape != (len(pairs["chosen_tokens"]),)
            if stale or list(cache["source"]) != list(source):
                raise ValueError(f"{path} was computed for other pairs or another reference; delete it to recompute")
            return {key: cache[key] for key in REFERENCE_KEYS}
    log.info("computing the reference log-probs of %d pairs once", len(pairs["chosen_tokens"]))
    logps = reference_logps(plan, load_reference(cfg, plan), pairs)
    if jax.process_index() == 0:
        cache = io.BytesIO()
        np.savez(cache, source=source, **logps)
        storage.write_bytes(path, cache.getvalue())
    return logps


def dpo_task(cfg: ml_collections.ConfigDict) -> Task:
    """The train loop's task for a DPO run with config `cfg` (dpo section, init.run/init.step)."""
    dpo = dpo_config(cfg)
    if MeshConfig.from_config(cfg.get("mesh")).sequence != 1 and dpo.reference == "cached":
        raise ConfigError("dpo.reference='cached' needs mesh.sequence=1 (its per-pair inputs have no length axis)")
    if cfg.train.eval_every_steps:
        raise ConfigError("train.eval_every_steps must be 0 for DPO (held-out evaluation is language modelling)")

    def make_feed(plan: Plan, workdir: str) -> PairFeed:
        pairs = read_pairs(pairs_dir(plan), plan.train.seq_len)
        if dpo.reference == "cached":
            logps = cached_reference_logps(cfg, plan, workdir, pairs)
            pairs.update({key: value[:, None] for key, value in logps.items()})  # [N, 1]: batch arrays are 2-D
        return PairFeed(pairs, plan.train.global_batch_size, plan.data.shuffle_seed, jax.process_index(),
                        jax.process_count())

    def frozen(plan: Plan, workdir: str) -> tuple:
        return (load_reference(cfg, plan),) if dpo.reference == "online" else ()

    keys = SEQUENCE_KEYS + (REFERENCE_KEYS if dpo.reference == "cached" else ())
    return Task(loss_fn=make_dpo_loss(dpo), batch_keys=keys, make_feed=make_feed, frozen=frozen)


def set_steps_from_epochs(cfg: ml_collections.ConfigDict) -> None:
    """train.steps for dpo.epochs passes over the prepared pairs (create_finetune_run's `finalize`)."""
    (folder, _), *_ = parse_mixture(cfg.data.mixtures.stable, "data.mixtures.stable")
    manifest = records.read_manifest(folder)
    cfg.train.steps = steps_for_epochs(manifest["num_documents"], cfg.train.global_batch_size, dpo_config(cfg).epochs)


def run_dpo(source: str, step: int | None, workdir: str, cfg: ml_collections.ConfigDict, data_files=(),
            tokenizer: str | None = None, train: bool = True, overrides=()) -> ml_collections.ConfigDict:
    """Creates (or resumes) the DPO run `workdir` from `source` on the pairs in `data_files`, then trains it.

    `overrides` are the --config.* overrides applied to `cfg` (derive.py).
    """
    from minicpm_jax.align.start import create_finetune_run
    from minicpm_jax.train.loop import train as train_run

    dpo_config(cfg)  # a bad dpo section fails before any data is prepared
    cfg = create_finetune_run(source, step, workdir, cfg, input_format="pairs", data_files=data_files,
                              tokenizer=tokenizer, overrides=overrides, finalize=set_steps_from_epochs)
    if train:
        train_run(cfg, workdir, dpo_task(cfg))
    return cfg
