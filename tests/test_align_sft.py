"""SFT: assistant-only loss masks through prepare-data and the packing pipeline, and exact resume mid-SFT."""

from __future__ import annotations

import numpy as np
import pytest

from minicpm_jax.align.sft import run_sft
from minicpm_jax.config import DataConfig
from minicpm_jax.data import records
from minicpm_jax.data.pipeline import make_pipeline
from minicpm_jax.data.prepare import prepare_data
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.run import checkpoint

from align_helpers import (
    align_config,
    copy_interrupted_at,
    make_source_run,
    write_jsonl,
)
from data_helpers import train_small_tokenizer
from train_helpers import REPO, assert_same_run, read_metrics

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": " Shakespeare "},
    {"role": "user", "content": "And the Psalms?"},
    {"role": "assistant", "content": "David 你好"},
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def _conversations(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a + b}"},
                                  {"role": "user", "content": "Say it again."},
                                  {"role": "assistant", "content": f"It is {a + b}."}][:2 + 2 * (i % 2)]})
    return rows


def test_packed_multi_turn_rows_carry_loss_on_assistant_tokens_only(tmp_path, tok_path):
    tok = Tokenizer(tok_path)
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 3 + [{"messages": [{"role": "user"}]}])
    manifest = prepare_data([tmp_path / "chat.jsonl"], tok_path, tmp_path / "prepared", input_format="chat")["all"]
    assert manifest["num_documents"] == 3 and manifest["skipped"] == {"bad_conversation": 1}

    data_cfg = DataConfig.from_config({"mixtures": {"stable": str(tmp_path / "prepared")}})
    with make_pipeline(data_cfg, "stable", seq_len=256, global_batch_size=1, process_index=0, process_count=1) as it:
        row = {key: value[0] for key, value in next(it).items()}
    segments = set(row["segment_ids"][row["segment_ids"] > 0].tolist())
    assert len(segments) >= 3  # several conversations (the data repeats) packed into one row
    for segment in segments:
        here = row["segment_ids"] == segment
        targets, mask = row["targets"][here], row["loss_mask"][here]
        assert row["tokens"][here][0] == tok.bos_id
        # The targets that carry loss are exactly each answer followed by EOS, nothing of system or user turns.
        counted = targets[mask == 1].tolist()
        eos_at = [i for i, t in enumerate(counted) if t == tok.eos_id]
        assert len(eos_at) == 2 and eos_at[-1] == len(counted) - 1
        assert tok.decode(counted[:eos_at[0]]) == "Shakespeare"
        assert tok.decode(counted[eos_at[0] + 1:eos_at[1]]) == "David 你好"
        # and every other target is the prompt text: system, the user turns with their markers
        prompt_text = "Answer in one word.<用户>Who wrote Hamlet?<AI><用户>And the Psalms?<AI>"
        assert tok.decode(targets[mask == 0].tolist()) == prompt_text
    assert not row["loss_mask"][row["segment_ids"] == 0].any()


def test_sft_resumed_mid_run_equals_an_uninterrupted_run(tmp_path, tok_path):
    source = make_source_run(tmp_path / "source")
    data = write_jsonl(tmp_path / "chat.jsonl", _conversations(40))
    cfg = align_config("sft", train__steps=8, schedule__warmup_steps=1, schedule__stable_steps=4,
                       schedule__decay_steps=3)
    straight = tmp_path / "straight"
    run_sft(str(source), None, str(straight), cfg, [str(data)], str(tok_path))

    stored = checkpoint.read_run_config(str(straight))
    assert stored.model.to_dict() == checkpoint.read_run_config(str(source)).model.to_dict()
    assert (stored.init.run, stored.init.step) == (str(source), 0)
    lrs = {m["step"]: m["lr"] for m in read_metrics(straight)}
    np.testing.assert_allclose([lrs[2], lrs[8]], [1e-3, 1e-3 * 0.1 ** (2 / 3)], rtol=1e-5)  # WSD 1e-3 -> 1e-4

    resumed = copy_interrupted_at(straight, 4, tmp_path / "resumed")
    # The same command again resumes the run from its latest checkpoint (step 4).
    run_sft(str(source), None, str(resumed), cfg, [str(data)], str(tok_path))
    assert_same_run(resumed, straight, 8)


def test_sft_and_dpo_commands_create_runs_from_the_example_files(tmp_path, tok_path, capsys):
    from minicpm_jax import cli

    source = make_source_run(tmp_path / "source")
    examples = REPO / "examples"
    # A source run that holds no tokenizer (an import of an HF folder without one): the command says so.
    assert cli.main(["sft", "--from", str(source), "--workdir", str(tmp_path / "sft"), "--data",
                     str(examples / "sft_example.jsonl"), "--no-train"]) == 2
    assert "holds no tokenizer.model and records no data.tokenizer: pass --tokenizer" in capsys.readouterr().err
    assert cli.main(["sft", "--from", str(source), "--workdir", str(tmp_path / "sft"), "--data",
                     str(examples / "sft_example.jsonl"), "--tokenizer", str(tok_path), "--no-train",
                     "--config.train.steps=30"]) == 0
    sft_cfg = checkpoint.read_run_config(str(tmp_path / "sft"))
    # The run keeps a copy of its tokenizer and uses it from then on.
    assert sft_cfg.train.steps == 30 and sft_cfg.data.tokenizer == str(tmp_path / "sft" / "tokenizer.model")
    assert (tmp_path / "sft" / "tokenizer.model").read_bytes() == tok_path.read_bytes()
    assert records.read_manifest(tmp_path / "sft" / "data")["num_documents"] == 96  # every example conversation

    # DPO from the SFT run (its step 0) inherits the SFT run's tokenizer; one epoch of 64 pairs in batches of 8.
    assert cli.main(["dpo", "--from", str(tmp_path / "sft"), "--workdir", str(tmp_path / "dpo"), "--data",
                     str(examples / "dpo_example.jsonl"), "--no-train"]) == 0
    dpo_cfg = checkpoint.read_run_config(str(tmp_path / "dpo"))
    assert dpo_cfg.train.steps == 8 and (dpo_cfg.init.run, dpo_cfg.init.step) == (str(tmp_path / "sft"), 0)
    assert dpo_cfg.schedule.name == "cosine" and dpo_cfg.schedule.peak_lr == 1e-5
