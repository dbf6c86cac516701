"""Held-out bits per byte against a hand computation; multiple-choice log-likelihoods against transformers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from minicpm_jax import cli, hf
from minicpm_jax.data import records
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.eval import evaluate
from minicpm_jax.infer import generate

from conftest import random_granite, tiny_config
from data_helpers import train_small_tokenizer
from train_helpers import write_token_folder


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    """(our model, transformers model, HF folder with tokenizer.model, tokenizer)."""
    folder = tmp_path_factory.mktemp("granite")
    tokenizer = Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))
    reference = random_granite(tiny_config(num_layers=2, vocab_size=400))
    reference.save_pretrained(folder)
    shutil.copy(tokenizer.path, folder / "tokenizer.model")
    model, _ = hf.load_hf(folder)
    return model, reference, folder, tokenizer


def _torch_continuation_loglikelihood(reference, context, continuation) -> float:
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(ids).logits.double(), dim=-1)[0]
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return float(sum(logprobs[p, ids[0, p + 1]] for p in positions))


def test_bits_per_byte_equals_hand_computation(granite, tmp_path):
    model, reference, _, _ = granite
    data = write_token_folder(tmp_path / "val", num_docs=12, high=128)
    results = evaluate.evaluate_model_on_sets(model, [str(data)], seq_len=64, batch_size=4)[str(data)]

    # By hand, with transformers: every document alone, every next-token prediction counted once.
    nats, count = 0.0, 0
    for shard in records.open_shards(data)[1]:
        for doc in (shard[i] for i in range(len(shard))):
            nats -= _torch_continuation_loglikelihood(reference, doc[:1].tolist(), doc[1:].tolist())
            count += len(doc) - 1
    bytes_per_token = records.read_manifest(data)["bytes_per_token"]
    assert results["tokens"] == count and results["bytes_per_token"] == bytes_per_token == 3.0
    assert results["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(nats / count / math.log(2) / 3.0, rel=1e-5)
    capped = evaluate.evaluate_model_on_sets(model, [str(data)], seq_len=64, batch_size=4, max_batches=1)
    assert 0 < capped[str(data)]["tokens"] < count


def test_loglikelihoods_match_transformers(granite):
    model, reference, _, tokenizer = granite
    pairs = [evaluate.encode_pair(tokenizer, "the quick brown fox", " jumps over"),
             evaluate.encode_pair(tokenizer, "模型 在 学习 ", "数据 and 你好"),
             evaluate.encode_pair(tokenizer, "", "a lazy dog"),
             ([1, 5, 6], [7]), ([1] + list(range(10, 70)), list(range(80, 90)))]
    scorer = evaluate.LoglikelihoodScorer(model, batch_size=2)
    for (context, continuation), (ours, _) in zip(pairs, scorer.loglikelihood(pairs)):
        assert ours == pytest.approx(_torch_continuation_loglikelihood(reference, context, continuation), abs=1e-3)
    # The model's own greedy continuation is flagged greedy; changing its last token is not.
    greedy = generate.generate_tokens(model, [[1, 5, 6]], max_new_tokens=4, ignore_eos=True)[0]
    altered = greedy[:-1] + [(greedy[-1] + 1) % 400]
    assert [flag for _, flag in scorer.loglikelihood([([1, 5, 6], greedy), ([1, 5, 6], altered)])] == [True, False]

    # Longer than max_length + 1: the oldest context tokens are dropped.
    short = evaluate.LoglikelihoodScorer(model, batch_size=2, max_length=16)
    context, continuation = pairs[4]
    kept = (context + continuation)[-17:]
    expected = _torch_continuation_loglikelihood(reference, kept[:-len(continuation)], continuation)
    assert short.loglikelihood([pairs[4]])[0][0] == pytest.approx(expected, abs=1e-3)


def test_multiple_choice_picks_the_likely_answer(granite, tmp_path):
    model, reference, _, tokenizer = granite
    # One-token choices: the model's argmax token is by definition the likeliest of them, so it must win.
    contexts = ["the quick brown", "模型 在", "tokens pack rows", "a lazy dog", "of length"]
    words = [" quick", " fox", " lazy", " dog", " over", " rows"]
    lines = []
    for i, context in enumerate(contexts):
        token = generate.generate_tokens(model, [tokenizer.encode(context, add_bos=True)], max_new_tokens=1,
                                         ignore_eos=True)[0]
        # Decoding a lone token drops its "▁" (SentencePiece reads it as the dummy prefix): put the space back.
        right = " " * tokenizer.id_to_piece(token[0]).startswith("\u2581") + tokenizer.decode(token)
        choices = [w for w in words if w != right][:3]
        choices.insert(i % 4, right)
        assert all(len(evaluate.encode_pair(tokenizer, context, c)[1]) == 1 for c in choices)
        lines.append({"context": context, "choices": choices, "label": i % 4})
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n")

    scorer = evaluate.LoglikelihoodScorer(model, batch_size=4)
    result = evaluate.score_multiple_choice(scorer, tokenizer, evaluate.read_multiple_choice(path))
    assert result["examples"] == len(contexts) and result["acc"] == 1.0
    for detail, line in zip(result["details"], lines):
        for choice, ours in zip(line["choices"], detail["loglikelihoods"]):
            context_ids, continuation_ids = evaluate.encode_pair(tokenizer, line["context"], choice)
            assert ours == pytest.approx(_torch_continuation_loglikelihood(reference, context_ids, continuation_ids),
                                         abs=1e-3)


def test_length_normalised_accuracy_divides_by_characters():
    class FixedScores:
        """Returns log-likelihoods given in advance (the aggregation is under test, not the model)."""

        def loglikelihood(self, pairs):
            return [(-2.0, False), (-6.0, False)][:len(pairs)]

    class Characters:
        bos_id = 1

        def encode(self, text):
            return [ord(c) for c in text]

    example = evaluate.MultipleChoice("q:", ("a", "bbbbbb"), label=1)
    result = evaluate.score_multiple_choice(FixedScores(), Characters(), [example])
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)  # -2 > -6, but -6/6 = -1 > -2/1


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', "'label' must be an index into the 2 choices"),
    ('{"context": "a", "choices": ["x"], "label": 0}', "at least 2 non-empty strings"),
    ('{"choices": ["x", "y"], "label": 0}', "'context' must be a string"),
    ('not json', "not valid JSON"),
])
def test_bad_multiple_choice_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        evaluate.read_multiple_choice(path)


def test_eval_command_writes_json_and_table(granite, tmp_path, capsys):
    model, _, folder, _ = granite
    data = write_token_folder(tmp_path / "val", num_docs=8, high=128)
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "the quick", "choices": [" brown fox", " lazy dog"], "label": 0}\n')
    out = tmp_path / "results.json"
    assert cli.main(["eval", "--model", str(folder), "--data", str(data), "--mc", str(mc), "--seq-len", "64",
                     "--batch-size", "4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    expected = evaluate.evaluate_model_on_sets(model, [str(data)], seq_len=64, batch_size=4)[str(data)]
    assert results["held_out"][str(data)]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert results["multiple_choice"][str(mc)]["examples"] == 1
    assert "bits/byte" in table and f"{expected['bits_per_byte']:.4f}" in table and "acc_norm" in table
