"""Evaluation: held-out loss per token and bits per byte, and multiple-choice log-likelihood.

Bits per byte (docs/recipe.md §6: the paper's scaling-law loss is per byte, which makes runs with different
tokenizers comparable) = mean token loss in nats / ln 2 / bytes_per_token, where bytes_per_token is the
prepared set's UTF-8 bytes per text token, recorded in its manifest by prepare-data. Training's periodic
evaluation (`train.evaluate`) calls `evaluate_prepared` here, so both report the same numbers.

Multiple choice (docs/recipe.md §11, ARC/HellaSwag-style "PPL" scoring): each JSONL line holds `context`,
`choices` (list of strings, each appended to the context as is) and `label` (index of the right one).
A choice's score is the summed log-likelihood of its tokens given the context; `acc` takes the best sum,
`acc_norm` the best sum per character of the choice (lm-evaluation-harness's acc_norm).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax import storage
from minicpm_jax.data import records
from minicpm_jax.data.pipeline import BATCH_KEYS, iter_eval_batches
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.model.transformer import MiniCPM
from minicpm_jax.progress import Ticker

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32  # scored rows are padded to a multiple of this, so few shapes are compiled


# ----------------------------------------------------------------------------------- held-out loss per byte
def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    return loss_nats_per_token / math.log(2) / bytes_per_token


def evaluate_prepared(eval_step: Callable, params: Any, prepared_dir: str, seq_len: int, global_batch_size: int, *,
                      num_batches: int | None = None,
                      place: Callable[[dict[str, np.ndarray]], Any] = lambda batch: batch) -> dict[str, float]:
    """Loss, token count, bytes per token and bits per byte over a prepared folder.

    eval_step(params, batch) -> (summed token loss, token count), e.g. `train.make_eval_step`. Without
    num_batches the whole folder is read once. With it, exactly num_batches steps run: a host whose share
    of the documents runs out feeds all-padding rows (no loss), so multi-host collectives stay in lockstep.
    `place` puts a host batch on the devices (e.g. `sharding.global_batch` on a mesh).
    """
    batches: Iterator[dict[str, np.ndarray]] = iter_eval_batches(prepared_dir, seq_len, global_batch_size)
    if num_batches is not None:
        local_rows = global_batch_size // jax.process_count()
        padding = {key: np.zeros((local_rows, seq_len), np.int32) for key in BATCH_KEYS}
        batches = _exactly(num_batches, batches, padding)
    manifest = records.read_manifest(prepared_dir)
    # Without num_batches, the packed batches of the whole folder: its tokens over a batch's (an estimate).
    total = num_batches or -(-int(manifest.get("num_tokens", 0)) // (seq_len * global_batch_size)) or None
    ticker = Ticker(f"eval {prepared_dir}", total, "batches")
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        batch_loss, batch_count = eval_step(params, place(batch))
        loss_sum, count = loss_sum + float(batch_loss), count + float(batch_count)
        ticker.update()
    loss = loss_sum / max(count, 1.0)
    bytes_per_token = manifest.get("bytes_per_token") or float("nan")
    return {"loss": loss, "tokens": int(count), "bytes_per_token": bytes_per_token,
            "bits_per_byte": bits_per_byte(loss, bytes_per_token)}


def _exactly(count: int, batches: Iterator[dict[str, np.ndarray]],
             padding: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    for _ in range(count):
        yield next(batches, padding)


def evaluate_model_on_sets(model: MiniCPM, prepared_dirs: Sequence[str], seq_len: int, batch_size: int, *,
                           max_batches: int | None = None,
                           tokenizer: Tokenizer | None = None) -> dict[str, dict[str, float]]:
    """evaluate_prepared for each folder, with one compiled step; keyed by folder."""
    # Imported here: train imports this module for its periodic evaluation.
    from minicpm_jax.train.step import make_eval_step

    graphdef, params = nnx.split(model)
    eval_step = make_eval_step(graphdef)
    results = {}
    for prepared_dir in prepared_dirs:
        _warn_on_tokenizer_mismatch(prepared_dir, tokenizer)
        results[prepared_dir] = evaluate_prepared(eval_step, params, prepared_dir, seq_len, batch_size,
                                                  num_batches=max_batches)
    return results


def _warn_on_tokenizer_mismatch(prepared_dir: str, tokenizer: Tokenizer | None) -> None:
    recorded = records.read_manifest(prepared_dir).get("tokenizer", {}).get("sha256")
    if tokenizer is not None and recorded and recorded != tokenizer.sha256:
        log.warning("%s was tokenized with another tokenizer (sha256 %s...) than %s (%s...): its loss is "
                    "not this model's", prepared_dir, recorded[:12], tokenizer.path, tokenizer.sha256[:12])


# ----------------------------------------------------------------------------------- continuation log-likelihood
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _continuation_scores(graphdef, state, tokens, targets, mask):
    """Per row: summed log-probability of `targets` where mask is 1, and whether each was the argmax."""
    logits = nnx.merge(graphdef, state)(tokens)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
    return (target_logprobs * mask).sum(axis=-1), greedy.all(axis=-1)


class LoglikelihoodScorer:
    """log P(continuation | context) for token-id pairs, batched (lm-evaluation-harness's loglikelihood).

    A pair longer than max_length + 1 tokens loses its oldest context tokens. Pairs are scored longest
    first (less padding) and returned in the given order.
    """

    def __init__(self, model: MiniCPM, *, batch_size: int = 8, max_length: int | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length={self.max_length} exceeds the model's max_position_embeddings="
                             f"{model.config.max_position_embeddings}")

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(summed log-likelihood, continuation is the greedy one) for each (context ids, continuation ids)."""
        rows = [self._row(i, context, continuation) for i, (context, continuation) in enumerate(pairs)]
        continuation_lengths = [len(continuation) for _, continuation in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        ticker = Ticker("log-likelihood", len(rows), "requests")
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            width = min(-(-len(rows[chunk[0]]) // LENGTH_BUCKET) * LENGTH_BUCKET, self.max_length + 1) - 1
            tokens, targets, mask = (np.zeros((self.batch_size, width), np.int32) for _ in range(3))
            for slot, i in enumerate(chunk):
                sequence = rows[i]
                n = len(sequence) - 1
                tokens[slot, :n], targets[slot, :n] = sequence[:-1], sequence[1:]
                mask[slot, n - continuation_lengths[i]:n] = 1
            sums, greedy = _continuation_scores(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(targets),
                                                jnp.asarray(mask))
            for slot, i in enumerate(chunk):
                results[i] = (float(sums[slot]), bool(greedy[slot]))
            ticker.update(len(chunk))
        return results

    def _row(self, index: int, context: Sequence[int], continuation: Sequence[int]) -> list[int]:
        """context + continuation, cut to the last max_length + 1 tokens."""
        if not context or not continuation:
            raise ValueError(f"pair {index}: context and continuation both need at least one token "
                             f"(got {len(context)} and {len(continuation)})")
        if len(continuation) > self.max_length:
            raise ValueError(f"pair {index}: the continuation has {len(continuation)} tokens, more than "
                             f"max_length={self.max_length}")
        return (list(context) + list(continuation))[-(self.max_length + 1):]


# ----------------------------------------------------------------------------------- multiple choice
@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: tuple[str, ...]
    label: int


def read_multiple_choice(path: str | os.PathLike) -> list[MultipleChoice]:
    """Examples from a JSONL file of {"context": str, "choices": [str, ...], "label": int}."""
    examples = []
    for line_number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from e
        examples.append(_multiple_choice(item, where))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _multiple_choice(item: Any, where: str) -> MultipleChoice:
    problem = _multiple_choice_problem(item)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return MultipleChoice(item["context"], tuple(item["choices"]), item["label"])


def _multiple_choice_problem(item: Any) -> str | None:
    """What is wrong with one parsed JSONL line, or None."""
    if not isinstance(item, dict):
        return f"expected an object with context, choices and label, got {type(item).__name__}"
    context, choices, label = item.get("context"), item.get("choices"), item.get("label")
    if not isinstance(context, str):
        return f"'context' must be a string, got {context!r}"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return f"'choices' must be a list of at least 2 non-empty strings, got {choices!r}"
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        return f"'label' must be an index into the {len(choices)} choices, got {label!r}"
    return None


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context ids, continuation ids), split as lm-evaluation-harness does.

    Trailing whitespace of the context moves to the continuation, and the continuation's ids are the
    tail of the ids of the whole text, so both are tokenized as the model saw such text in training.
    """
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.bos_id] + context_ids, whole[len(context_ids):]


def score_multiple_choice(scorer: LoglikelihoodScorer, tokenizer: Tokenizer,
                          examples: Sequence[MultipleChoice]) -> dict[str, Any]:
    """acc (by summed log-likelihood) and acc_norm (per character), with every example's choice scores."""
    pairs = [encode_pair(tokenizer, ex.context, choice) for ex in examples for choice in ex.choices]
    scores = iter(scorer.loglikelihood(pairs))
    details, correct, correct_norm = [], 0, 0
    for ex in examples:
        loglikelihoods = [next(scores)[0] for _ in ex.choices]
        per_char = [ll / len(choice) for ll, choice in zip(loglikelihoods, ex.choices)]
        pick, pick_norm = int(np.argmax(loglikelihoods)), int(np.argmax(per_char))
        correct += pick == ex.label
        correct_norm += pick_norm == ex.label
        details.append({"label": ex.label, "loglikelihoods": loglikelihoods, "pred": pick, "pred_norm": pick_norm})
    return {"examples": len(examples), "acc": correct / len(examples), "acc_norm": correct_norm / len(examples),
            "details": details}


# ----------------------------------------------------------------------------------- reporting
def format_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A readable table of `{"held_out": {set: {...}}, "multiple_choice": {file: {...}}}`."""
    lines = []
    if results.get("held_out"):
        lines += ["held-out set | tokens | loss (nats/token) | bytes/token | bits/byte", "---|---|---|---|---"]
        lines += [f"{name} | {r['tokens']} | {r['loss']:.4f} | {r['bytes_per_token']:.3f} | {r['bits_per_byte']:.4f}"
                  for name, r in results["held_out"].items()]
    if results.get("multiple_choice"):
        lines += ["" if lines else None, "multiple-choice file | examples | acc | acc_norm", "---|---|---|---"]
        lines += [f"{name} | {r['examples']} | {r['acc']:.4f} | {r['acc_norm']:.4f}"
                  for name, r in results["multiple_choice"].items()]
    return "\n".join(line for line in lines if line is not None)
