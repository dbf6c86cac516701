"""KV-cache generation against a no-cache recompute, transformers' generate, and itself one row at a time."""

from __future__ import annotations

import functools
import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import cli, hf
from minicpm_jax.data.chat import encode_chat_prompt
from minicpm_jax.infer import generate
from minicpm_jax.infer.inference import load_for_inference
from minicpm_jax.model import MiniCPM
from minicpm_jax.run import checkpoint

from conftest import random_granite, tiny_config
from data_helpers import train_small_tokenizer

PROMPTS = [[1, 5, 17, 99, 3, 64, 12], [1, 40], [1] + list(range(3, 60, 2)), [1, 7, 7, 7, 100]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    """(our model, transformers model, HF folder) of one random Granite model with GQA and untied head."""
    folder = tmp_path_factory.mktemp("granite")
    reference = random_granite(tiny_config(num_layers=2, vocab_size=400, tie_word_embeddings=False))
    reference.save_pretrained(folder)
    model, _ = hf.load_hf(folder)
    return model, reference, folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from minicpm_jax.data.tokenizer import Tokenizer

    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def _recompute_greedy(model, prompt, new_tokens, width=64):
    """Greedy decoding that recomputes the whole sequence for every token (no cache).

    The sequence sits at the front of a fixed-width row: causal attention makes the tail irrelevant, and
    one width means one compilation.
    """
    forward = nnx.jit(lambda m, tokens: m(tokens))
    row = np.zeros((1, width), np.int32)
    row[0, :len(prompt)] = prompt
    for position in range(len(prompt), len(prompt) + new_tokens):
        row[0, position] = int(jnp.argmax(forward(model, jnp.asarray(row))[0, position - 1]))
    return row[0, len(prompt):len(prompt) + new_tokens].tolist()


def test_greedy_kv_cache_equals_full_recompute(granite):
    model, _, _ = granite
    for prompt in PROMPTS[:3]:
        expected = _recompute_greedy(model, prompt, NEW_TOKENS)
        assert len(set(expected)) > 2, "a degenerate model would make this test vacuous"
        assert generate.generate_tokens(model, [prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True) == [expected]


def test_greedy_matches_transformers_generate(granite):
    import torch

    model, reference, _ = granite
    reference.generation_config.eos_token_id = None  # both sides produce exactly NEW_TOKENS tokens
    for prompt in PROMPTS[:2]:
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                          pad_token_id=0)[0, len(prompt):].tolist()
        assert generate.generate_tokens(model, [prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True) == [expected]


def test_batch_of_mixed_lengths_equals_one_by_one(granite):
    model, _, _ = granite
    batched = generate.generate_tokens(model, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len({len(p) for p in PROMPTS}) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, batched):
        assert generate.generate_tokens(model, [prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True) == [row]


def test_one_compiled_step_serves_every_token(granite):
    model, _, _ = granite
    before = generate.compiled_step_count()
    batch = [PROMPTS[0]] * 3  # a batch size no other test uses, so its step is compiled here
    generate.generate_tokens(model, batch, max_new_tokens=20, ignore_eos=True)
    assert generate.compiled_step_count() == before + 1
    # Another prompt length in the same bucket and more tokens in the same cache bucket: nothing new to compile.
    generate.generate_tokens(model, [PROMPTS[1]] * 3, max_new_tokens=30, ignore_eos=True, temperature=0.0)
    assert generate.compiled_step_count() == before + 1


def test_stops_at_eos(granite):
    model, _, _ = granite
    full = generate.generate_tokens(model, [PROMPTS[0]], max_new_tokens=NEW_TOKENS, ignore_eos=True)[0]
    eos = full[4]
    assert generate.generate_tokens(model, [PROMPTS[0]], max_new_tokens=NEW_TOKENS, eos_id=eos) == [
        full[:full.index(eos)]]


def test_seeded_sampling_is_reproducible(granite):
    model, _, _ = granite
    kwargs = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "ignore_eos": True}
    first = generate.generate_tokens(model, PROMPTS, seed=7, **kwargs)
    assert generate.generate_tokens(model, PROMPTS, seed=7, **kwargs) == first
    assert generate.generate_tokens(model, PROMPTS, seed=8, **kwargs) != first
    greedy = generate.generate_tokens(model, PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert first != greedy
    # top-k 1 leaves only the argmax: sampling then is greedy whatever the seed.
    assert generate.generate_tokens(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=1,
                                    ignore_eos=True, seed=3) == greedy


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = jnp.asarray(np.tile(np.log(probs), (4000, 1)), jnp.float32)
    sample = jax.jit(functools.partial(generate.sample_next, greedy=False))
    draw = lambda **kw: set(np.asarray(sample(logits, jax.random.key(0), generate.Sampling(1.0, **kw).as_array())))
    assert draw() == {0, 1, 2, 3, 4}
    assert draw(top_k=2) == {1, 3}
    assert draw(top_k=9) == {0, 1, 2, 3, 4}
    assert draw(top_k=3, top_p=0.75) == {1, 3}  # top-k leaves 0.4, 0.3, 0.15: renormalised, 0.47 + 0.35 >= 0.75
    assert draw(top_p=0.6) == {1, 3}  # 0.4 < 0.6, so 0.3 joins; then 0.7 >= 0.6
    assert draw(top_p=0.4) == {1}
    assert draw(top_p=0.75) == {1, 3, 4}
    with pytest.raises(ValueError, match="top_p"):
        generate.Sampling(1.0, top_p=0.0)


def test_bad_prompts_are_rejected(granite):
    model, _, _ = granite
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate.generate_tokens(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 400\)"):
        generate.generate_tokens(model, [[1, 400]])
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        generate.generate_tokens(model, [[1] * 200], max_new_tokens=100)


def test_stop_strings_and_streaming(granite, tokenizer):
    model, _, _ = granite
    prompt = "the quick brown"
    full = generate.generate(model, tokenizer, [prompt], max_new_tokens=20)[0]
    assert len(full) > 8
    stop = full[5:8]
    pieces = []
    stopped = generate.generate(model, tokenizer, [prompt], max_new_tokens=20, stop=[stop], stream=pieces.append)[0]
    assert stopped == full[:full.index(stop)]
    assert "".join(pieces) == stopped and len(pieces) > 1
    batched = generate.generate(model, tokenizer, [prompt, "模型 你好"], max_new_tokens=20)
    assert batched[0] == full


def test_chat_session_keeps_history(granite, tokenizer):
    model, _, _ = granite
    session = generate.ChatSession(model, tokenizer, max_new_tokens=8)
    first = session.send("hello there")
    second = session.send("and again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"] == first
    prompt = encode_chat_prompt(tokenizer, session.messages[:3])
    assert generate.generate_text(model, tokenizer, [prompt], max_new_tokens=8, stop=["<用户>"]) == [second]
    session.reset()
    assert session.messages == []


def test_run_directory_and_hf_folder_load_the_same_model(granite, tmp_path):
    import ml_collections

    model, _, _ = granite
    checkpoint.save_model(str(tmp_path / "run"), 0, model)  # what import-hf writes
    checkpoint.write_run_config(str(tmp_path / "run"), ml_collections.ConfigDict({"model": model.config.to_dict()}))
    from_run, tokenizer = load_for_inference(tmp_path / "run")
    assert tokenizer is None
    assert generate.generate_tokens(from_run, PROMPTS[:2], max_new_tokens=6) == generate.generate_tokens(
        model, PROMPTS[:2], max_new_tokens=6)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load_for_inference(tmp_path)


def test_generate_and_chat_commands(granite, tokenizer, tmp_path, capsys, monkeypatch):
    import shutil

    model, _, folder = granite
    hf_dir = tmp_path / "hf"
    shutil.copytree(folder, hf_dir)
    shutil.copy(tokenizer.path, hf_dir / "tokenizer.model")
    assert cli.main(["generate", "--model", str(hf_dir), "--prompt", "the quick", "--max-new-tokens", "6"]) == 0
    expected = generate.generate(model, tokenizer, ["the quick"], max_new_tokens=6)[0]
    assert capsys.readouterr().out == f"the quick{expected}\n"

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/reset\nhello there\n"))
    assert cli.main(["chat", "--model", str(hf_dir), "--max-new-tokens", "5"]) == 0
    reply = generate.ChatSession(model, tokenizer, max_new_tokens=5).send("hello there")
    assert capsys.readouterr().out == f"{reply}\n{reply}\n"


def test_moe_model_decodes_like_its_recompute():
    model = MiniCPM(tiny_config(num_layers=2, num_experts=4, num_experts_per_tok=2), rngs=nnx.Rngs(2))
    prompt = PROMPTS[0]
    expected = _recompute_greedy(model, prompt, NEW_TOKENS)
    assert generate.generate_tokens(model, [prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True) == [expected]
