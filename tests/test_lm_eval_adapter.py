"""The lm-evaluation-harness adapter, through lm_eval's own registry, Instances and evaluator (needs [eval])."""

from __future__ import annotations

import json
import shutil

import pytest
from test_evaluate import _torch_continuation_loglikelihood

from minicpm_jax import hf
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.eval import evaluate
from minicpm_jax.infer import generate

from conftest import random_granite, tiny_config
from data_helpers import train_small_tokenizer

lm_eval = pytest.importorskip("lm_eval")


def _task(name: str, data: str, **fields) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", **fields}


@pytest.mark.slow
def test_adapter_answers_lm_eval_requests(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import minicpm_jax.eval.lm_eval_adapter  # noqa: F401  (registers "minicpm-jax")

    tokenizer = Tokenizer(train_small_tokenizer(tmp_path))
    reference = random_granite(tiny_config(num_layers=2, vocab_size=400))
    reference.save_pretrained(tmp_path / "hf")
    shutil.copy(tokenizer.path, tmp_path / "hf" / "tokenizer.model")
    model, _ = hf.load_hf(tmp_path / "hf")
    lm = get_model("minicpm-jax").create_from_arg_string(f"pretrained={tmp_path / 'hf'}",
                                                        {"batch_size": 4, "device": "cpu", "max_batch_size": None})

    def requests(kind, *args):
        return [Instance(kind, {}, arguments, i) for i, arguments in enumerate(args)]

    pairs = [("the quick", " brown fox"), ("模型 在 ", "学习")]
    scorer = evaluate.LoglikelihoodScorer(model, batch_size=4)
    assert lm.loglikelihood(requests("loglikelihood", *pairs)) == scorer.loglikelihood(
        [evaluate.encode_pair(tokenizer, *pair) for pair in pairs])

    text = "tokens pack rows of length"
    ids = tokenizer.encode(text, add_bos=True)
    (rolling,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert rolling == pytest.approx(_torch_continuation_loglikelihood(reference, ids[:1], ids[1:]), abs=1e-3)

    settings = {"until": ["\n", "fox"], "max_gen_toks": 6}
    generated = lm.generate_until(requests("generate_until", ("the quick", settings), ("a lazy", settings)))
    assert generated == generate.generate(model, tokenizer, ["the quick", "a lazy"], max_new_tokens=6,
                                          stop=["\n", "fox"])

    # lm_eval's evaluator drives all three request types through the adapter and aggregates the results.
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": "the quick", "choices": [" brown", " fox"], "label": i % 2}) + "\n"
                            for i in range(4)))
    tasks = [_task("tiny_mc", str(data), output_type="multiple_choice", doc_to_text="{{context}}",
                   doc_to_choice="{{choices}}", doc_to_target="{{label}}", metric_list=[{"metric": "acc"}]),
             _task("tiny_gen", str(data), output_type="generate_until", doc_to_text="{{context}}",
                   doc_to_target="{{choices[0]}}", generation_kwargs={"until": ["\n"], "max_gen_toks": 4},
                   metric_list=[{"metric": "exact_match"}]),
             _task("tiny_ppl", str(data), output_type="loglikelihood_rolling", doc_to_text="",
                   doc_to_target="{{context}}", metric_list=[{"metric": "bits_per_byte"}])]
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks)["results"]
    assert results["tiny_mc"]["acc,none"] == 0.5  # the same context every time: one answer, right half the time
    assert 0 <= results["tiny_gen"]["exact_match,none"] <= 1
    assert 0 < results["tiny_ppl"]["bits_per_byte,none"] < 20
