"""MiniCPM chat template (facts §3), as text and as token ids with an SFT loss mask.

The template, identical to the `chat_template` that MiniCPM checkpoints carry:
    user       `<用户>` + content.strip() + `<AI>`
    assistant  content.strip(), no separator
    system     content.strip(), no slot of its own (so it belongs first)
The text has no BOS; token ids get BOS prepended, as the tokenizer does (add_bos_token).
For training, every assistant turn is followed by EOS, which is how the model learns to stop; the
loss mask is 1 on the assistant tokens and that EOS, 0 elsewhere. The generation prompt is the
template text of the conversation so far (no EOS after earlier answers, as in HF `chat()`), and it
ends with `<AI>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from minicpm_jax.data.tokenizer import CHAT_AI, CHAT_USER, Tokenizer

ROLES = ("system", "user", "assistant")


class ChatExample(NamedTuple):
    ids: list[int]
    loss_mask: list[int]


def _check(messages: Sequence[Mapping[str, str]]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first (the template has no system slot)")


def _turn_text(message: Mapping[str, str]) -> str:
    content = message["content"].strip()
    return f"{CHAT_USER}{content}{CHAT_AI}" if message["role"] == "user" else content


def render_chat_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The template text, e.g. `<用户>Hello<AI>Hi there` (no BOS, no EOS): for HF chat_template parity."""
    _check(messages)
    return "".join(_turn_text(m) for m in messages)


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Ids to generate the next assistant turn from: BOS + template text, ending with `<AI>`."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a generation prompt must end with a user message")
    return [tokenizer.bos_id] + tokenizer.encode(render_chat_text(messages))


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> ChatExample:
    """Training ids and loss mask: BOS, turns, and EOS after each assistant turn (mask 1 on those)."""
    _check(messages)
    ids, mask = [tokenizer.bos_id], [0]
    # Text between two EOS tokens is encoded in one call, exactly as the prompt would be, so the ids
    # of a conversation's prompt are a prefix of its training ids. Byte spans of the assistant turns
    # then pick out which tokens carry loss.
    run, spans = "", []
    for message in messages:
        text = _turn_text(message)
        if message["role"] == "assistant":
            start = len(run.encode("utf-8"))
            spans.append((start, start + len(text.encode("utf-8"))))
        run += text
        if message["role"] == "assistant":
            _append_run(tokenizer, run, spans, ids, mask)
            ids.append(tokenizer.eos_id)
            mask.append(1)
            run, spans = "", []
    _append_run(tokenizer, run, spans, ids, mask)
    return ChatExample(ids, mask)


def _append_run(tokenizer: Tokenizer, run: str, spans: list[tuple[int, int]], ids: list[int], mask: list[int]):
    for token_id, begin in tokenizer.encode_with_offsets(run) if run else ():
        ids.append(token_id)
        mask.append(int(any(start <= begin < end for start, end in spans)))
