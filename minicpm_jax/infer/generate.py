"""Text generation with a preallocated KV cache: one prefill call, then one jitted single-token step per token.

    texts = generate(model, tokenizer, ["ROMEO:"], max_new_tokens=64, temperature=0.8, top_p=0.8, seed=0)
    ids = generate_tokens(model, [[1, 523, 99]], max_new_tokens=16)        # token level, greedy

Prompts of different lengths share one batch: they are left-padded to a common (bucketed) length, and
each row's positions and attention mask start at its first real token (`model/kv_cache.py`), so a row
generates what it would generate alone. Prompt and cache lengths are rounded up to buckets, so that a
conversation whose prompt grows turn by turn reuses the same compiled prefill and step; the step
function compiles once per (batch, cache length, greedy or sampling) and never per token.
Sampling (temperature, top-k, top-p) runs on the device inside the step; only the chosen ids come back.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpm_jax.data.chat import encode_chat_prompt
from minicpm_jax.data.tokenizer import CHAT_USER, Tokenizer
from minicpm_jax.model.kv_cache import init_cache
from minicpm_jax.model.transformer import MiniCPM

log = logging.getLogger(__name__)

PROMPT_BUCKET = 32  # prompt lengths are padded to a multiple of this (fewer prefill compilations)
CACHE_BUCKET = 128  # cache lengths likewise (fewer step compilations)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else softmax(logits / T) within top-k and top-p."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def as_array(self) -> jax.Array:
        return jnp.array([self.temperature, self.top_k, self.top_p], jnp.float32)


def sample_next(logits: jax.Array, key: jax.Array, sampling: jax.Array, *, greedy: bool) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 token ids.

    `sampling` is `Sampling.as_array()`: traced values, so one compiled step serves any temperature,
    top-k and top-p; only greedy (argmax) or not is fixed at trace time.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    temperature, top_k, top_p = sampling[0], sampling[1].astype(jnp.int32), sampling[2]
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    # top-k: nothing below the k-th largest logit (k = 0: no cut).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take(sorted_logits, k - 1, axis=-1)[:, None]
    sorted_logits = jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits)
    # top-p: the smallest set of most likely tokens whose probability reaches top_p (always the first).
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < jnp.maximum(cutoff, kth), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, cache, starts, key, sampling, *, greedy: bool):
    """Writes the (left-padded) prompts into the cache from slot 0; samples each row's first new token."""
    logits, cache = nnx.merge(graphdef, state).decode(tokens, cache, jnp.int32(0), starts, last_logits_only=True)
    index = jnp.int32(tokens.shape[1])
    return sample_next(logits[:, -1], jax.random.fold_in(key, index), sampling, greedy=greedy), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _step(graphdef, state, token, cache, index, starts, key, sampling, *, greedy: bool):
    """Feeds one token per row at slot `index`; samples the next one. The same compiled code serves every token."""
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache, index, starts)
    return sample_next(logits[:, -1], jax.random.fold_in(key, index + 1), sampling, greedy=greedy), cache


def compiled_step_count() -> int:
    """How many versions of the single-token step have been compiled in this process (for tests and logs)."""
    return _step._cache_size()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; it needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def generate_tokens(model: MiniCPM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_id: int | None = None, ignore_eos: bool = False,
                    should_stop: Callable[[int, list[int]], bool] | None = None,
                    on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New token ids for each prompt (prompt ids not included, the EOS that ended a row neither).

    eos_id defaults to the model's; ignore_eos generates exactly max_new_tokens (benchmarks).
    should_stop(row, tokens so far) ends a row early (stop strings); on_token(row, id) sees every kept
    token as soon as it is known (streaming). Rows stop independently; the batch stops when all have.
    """
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={cfg.max_position_embeddings}")
    sampling = Sampling(temperature, top_k, top_p)
    eos_id = cfg.eos_token_id if eos_id is None else eos_id

    prompt_len = _round_up(longest, PROMPT_BUCKET)
    slots = _round_up(prompt_len + max_new_tokens, CACHE_BUCKET)
    tokens = np.zeros((len(prompts), prompt_len), np.int32)  # left padding (any id: it is masked out)
    starts = np.array([prompt_len - len(p) for p in prompts], np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, starts[row]:] = prompt

    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    starts = jnp.asarray(starts)
    greedy, sampling = sampling.temperature == 0, sampling.as_array()
    token, cache = _prefill(graphdef, state, jnp.asarray(tokens), init_cache(cfg, len(prompts), slots), starts, key,
                            sampling, greedy=greedy)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for i in range(max_new_tokens):
        # Dispatch the next step before reading this token back, so the device works while the host checks stops.
        pending = token
        if i + 1 < max_new_tokens:
            token, cache = _step(graphdef, state, pending, cache, jnp.int32(prompt_len + i), starts, key, sampling,
                                 greedy=greedy)
        for row, token_id in enumerate(np.asarray(pending).tolist()):
            if done[row]:
                continue
            if token_id == eos_id and not ignore_eos:
                done[row] = True
                continue
            outputs[row].append(token_id)
            if on_token is not None:
                on_token(row, token_id)
            if should_stop is not None and should_stop(row, outputs[row]):
                done[row] = True
        if all(done):
            break
    return outputs


class TextStream:
    """Turns one row's token ids into text deltas as they arrive, for printing while generating.

    A delta is emitted only once it is final: not while the text ends in an incomplete UTF-8 sequence
    (byte-fallback pieces), and not the last characters that could still begin a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, write: Callable[[str], None], stop: Sequence[str] = ()):
        self.tokenizer, self.write, self.stop = tokenizer, write, tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0

    def __call__(self, row: int, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        holdback = max((len(s) - 1 for s in self.stop), default=0)
        self._emit(truncate_at_stop(text, self.stop), len(text) - holdback)

    def finish(self) -> None:
        text = truncate_at_stop(self.tokenizer.decode(self.ids), self.stop)
        self._emit(text, len(text))

    def _emit(self, text: str, upto: int) -> None:
        upto = min(upto, len(text))
        if upto > self.emitted:
            self.write(text[self.emitted:upto])
            self.emitted = upto


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate(model: MiniCPM, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop: Sequence[str] | str | None = None, add_bos: bool = True,
             stream: Callable[[str], None] | None = None, truncate_prompts: bool = False) -> list[str]:
    """The generated continuation of each prompt (prompt not included), cut before any stop string.

    Generation ends at EOS, at a stop string or after max_new_tokens. `stream` (one prompt only) is called
    with each new piece of text as soon as it is final, e.g. `stream=lambda s: print(s, end="", flush=True)`.
    truncate_prompts keeps only the newest prompt tokens that leave room for max_new_tokens (else a
    prompt too long for the model is an error).
    """
    ids = tokenizer.encode_batch(prompts, add_bos=add_bos)
    if truncate_prompts:
        room = max(model.config.max_position_embeddings - max_new_tokens, 1)
        ids = [prompt[-room:] for prompt in ids]
    return generate_text(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop=stop, stream=stream)


def generate_text(model: MiniCPM, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], *,
                  stop: Sequence[str] | str | None = None, stream: Callable[[str], None] | None = None,
                  **generation: Any) -> list[str]:
    """`generate` for prompts that are already token ids (e.g. a chat template); generation: generate_tokens'."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if stream is not None and len(prompts) != 1:
        raise ValueError(f"streaming prints one generation; got {len(prompts)} prompts")

    def should_stop(_row: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens)
        return any(s in text for s in stop)

    streamer = TextStream(tokenizer, stream, stop) if stream is not None else None
    outputs = generate_tokens(model, prompts, eos_id=tokenizer.eos_id, should_stop=should_stop if stop else None,
                              on_token=streamer, **generation)
    if streamer is not None:
        streamer.finish()
    return [truncate_at_stop(tokenizer.decode(tokens), stop) for tokens in outputs]


class ChatSession:
    """A conversation with the model: each `send` renders the whole history with the chat template
    (data/chat.py), generates the assistant's answer and appends both turns to the history.

    The model may start a new user turn on its own; generation stops at the user marker.
    """

    def __init__(self, model: MiniCPM, tokenizer: Tokenizer, *, system: str | None = None, **generation: Any):
        self.model, self.tokenizer, self.generation = model, tokenizer, generation
        self.system = system
        self.messages: list[dict[str, str]] = []
        self._clamp_noted = False  # the note that answers are cut to the context is shown once
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """The answer to `text`. An answer is at most max_new_tokens long and at most what the model's context
        leaves after the conversation (a note says so, once); ValueError when the conversation fills it."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt = encode_chat_prompt(self.tokenizer, messages)
        context = self.model.config.max_position_embeddings
        room = context - len(prompt)
        if room < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context of {context} tokens")
        generation = dict(self.generation)
        wanted = generation.get("max_new_tokens", 64)
        if wanted > room:
            if not self._clamp_noted:
                log.warning("max_new_tokens=%d does not fit the model's context of %d tokens after the conversation; "
                            "each answer stops where the context ends (%d tokens now)", wanted, context, room)
                self._clamp_noted = True
            generation["max_new_tokens"] = room
        reply = generate_text(self.model, self.tokenizer, [prompt], stop=[CHAT_USER], stream=stream,
                              **generation)[0]
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply
