"""MiniCPM chat template (docs/recipe.md §10), as text and as token ids with an SFT loss mask.

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

# The same template as Jinja, for HF's tokenizer_config.json: apply_chat_template(tokenize=False) gives
# BOS + render_chat_text, and tokenized it gives encode_chat_prompt's ids (tests/test_align_hf.py).
# MiniCPM's own template starts without `bos_token` and relies on the tokenizer adding it; with
# apply_chat_template(tokenize=True), which adds no special tokens, that would drop the BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    f"{{% if message['role'] == 'user' %}}{{{{ '{CHAT_USER}' + message['content'].strip() + '{CHAT_AI}' }}}}"
    "{% else %}{{ message['content'].strip() }}{% endif %}{% endfor %}"
)


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


class PreferencePair(NamedTuple):
    """A prompt's chosen and rejected continuations; each mask covers only its response (and EOS)."""

    chosen: ChatExample
    rejected: ChatExample


def _as_messages(value, role: str, key: str) -> list[dict[str, str]]:
    """A plain string is one `role` message; a list must already be messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return value
    raise ValueError(f"{key} must be a string or a list of messages, got {type(value).__name__}")


def preference_from_json(obj: Mapping) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen response messages, rejected response messages) of a preference record.

    Accepted: `prompt`/`chosen`/`rejected` as strings or message lists, or (no `prompt`) `chosen` and
    `rejected` as whole conversations that share everything but their last message.
    """
    missing = [key for key in ("chosen", "rejected") if key not in obj]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    if "prompt" in obj:
        prompt = _as_messages(obj["prompt"], "user", "prompt")
        chosen = _as_messages(obj["chosen"], "assistant", "chosen")
        rejected = _as_messages(obj["rejected"], "assistant", "rejected")
    else:
        full_chosen = _as_messages(obj["chosen"], "assistant", "chosen")
        full_rejected = _as_messages(obj["rejected"], "assistant", "rejected")
        if len(full_chosen) < 2 or full_chosen[:-1] != full_rejected[:-1]:
            raise ValueError("without a prompt, chosen and rejected must be conversations differing only in "
                             "their last message")
        prompt, chosen, rejected = full_chosen[:-1], full_chosen[-1:], full_rejected[-1:]
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("the prompt must end with a user message")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or any(m.get("role") != "assistant" for m in response):
            raise ValueError(f"{key} must be assistant message(s)")
    return prompt, chosen, rejected


def encode_response(tokenizer: Tokenizer, prompt: Sequence[Mapping[str, str]],
                    response: Sequence[Mapping[str, str]]) -> ChatExample:
    """Training ids of prompt + response; the mask covers the response only, not earlier assistant turns."""
    prompt_length = len(encode_chat(tokenizer, prompt).ids)
    full = encode_chat(tokenizer, [*prompt, *response])
    return ChatExample(full.ids, [0] * prompt_length + full.loss_mask[prompt_length:])


def encode_preference(tokenizer: Tokenizer, obj: Mapping) -> PreferencePair:
    prompt, chosen, rejected = preference_from_json(obj)
    return PreferencePair(encode_response(tokenizer, prompt, chosen), encode_response(tokenizer, prompt, rejected))


def conversation_from_json(obj: Mapping) -> list[dict]:
    """The `messages` of an SFT record, checked, with at least one assistant turn to learn from."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("`messages` must be a list of {role, content} objects")
    _check(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a conversation without an assistant turn has nothing to learn")
    return messages
