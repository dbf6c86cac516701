"""Every user mistake the CLI can meet ends in one line naming the file, key or tensor, and exit code 2; no traceback.

Each row of CASES builds its inputs in a temporary folder and returns the command line; the test runs the real
CLI in-process (`cli.main`) and checks the exit code, that stderr is exactly one line holding every expected
fragment, and that no "Traceback" was printed. The other tests cover the rest of the policy: --verbose keeps the
traceback, a bug keeps it too, the NaN stop and Ctrl-C exit with one line, and what used to fail now works
(`params --config RUN/config.json`, `--config.a.b v`, `plan`'s exit codes, clamped chat answers).
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from minicpm_jax import cli, hf
from minicpm_jax.config import ConfigError
from minicpm_jax.model import MiniCPM

from conftest import tiny_config
from train_helpers import REPO, tiny_run_overrides, write_token_folder

DEMO = str(REPO / "configs" / "demo.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """One exported tiny HF folder and its import-hf run, shared by the cases (each case copies what it edits)."""
    root = tmp_path_factory.mktemp("assets")
    hf.save_hf(MiniCPM(tiny_config(), rngs=nnx.Rngs(0)), None, root / "hf", arch="minicpm")
    assert cli.main(["import-hf", "--hf", str(root / "hf"), "--workdir", str(root / "imported")]) == 0
    return root


def _hf_copy(assets: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(assets / "hf", tmp / "hf"))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ the cases
# Each: (assets, tmp) -> argv. The expected fragments may use {tmp}.

def config_syntax_error(assets, tmp):
    (tmp / "bad.py").write_text("def get_config():\n    return None\n\nx = = 1\n")
    return ["params", "--config", tmp / "bad.py"]


def config_name_error(assets, tmp):
    (tmp / "typo.py").write_text("def get_config():\n    return confg\n")
    return ["params", "--config", tmp / "typo.py"]


def config_is_a_run_directory(assets, tmp):
    return ["params", "--config", assets / "imported"]


def override_without_value(assets, tmp):
    return ["params", "--config", DEMO, "--config.model.num_layers"]


def parquet_without_text_column(assets, tmp):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text", "more text"]}), tmp / "docs.parquet")
    return ["train-tokenizer", "--input", tmp / "docs.parquet", "--vocab-size", "400", "--out", tmp / "tok"]


def parquet_that_is_not_parquet(assets, tmp):
    pytest.importorskip("pyarrow")
    (tmp / "docs.parquet").write_text('{"text": "I am JSONL"}\n')
    return ["train-tokenizer", "--input", tmp / "docs.parquet", "--vocab-size", "400", "--out", tmp / "tok"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def bin_with_pickled_code(assets, tmp):
    torch = pytest.importorskip("torch")
    (tmp / "bin").mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _RunsCode()}, tmp / "bin" / "pytorch_model.bin")
    return ["convert-bin", "--hf", tmp / "bin", "--out", tmp / "safe"]


def bin_that_is_a_raw_pickle(assets, tmp):
    pytest.importorskip("torch")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _RunsCode()}, protocol=4))
    return ["convert-bin", "--hf", tmp / "bin", "--out", tmp / "safe"]


def hf_config_value_of_the_wrong_type(assets, tmp):
    folder = _hf_copy(assets, tmp)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    return ["import-hf", "--hf", folder, "--workdir", tmp / "run"]


def safetensors_header_corrupted(assets, tmp):
    folder = _hf_copy(assets, tmp)
    data = bytearray((folder / "model.safetensors").read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8:8 + header_len] = b"{" + b"#" * (header_len - 1)  # same length, not JSON
    (folder / "model.safetensors").write_bytes(bytes(data))
    return ["import-hf", "--hf", folder, "--workdir", tmp / "run"]


def shard_outside_the_folder(assets, tmp):
    folder = _hf_copy(assets, tmp)
    names = list(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").rename(tmp / "x")
    index = {"metadata": {}, "weight_map": {name: "../x" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["import-hf", "--hf", folder, "--workdir", tmp / "run"]


def non_finite_weights(assets, tmp):
    folder = _hf_copy(assets, tmp)

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.inf

    _edit_tensors(folder, poison)
    return ["import-hf", "--hf", folder, "--workdir", tmp / "run"]


def int8_weights(assets, tmp):
    folder = _hf_copy(assets, tmp)

    def quantize(tensors):
        weight = tensors["model.layers.0.self_attn.q_proj.weight"]
        tensors["model.layers.0.self_attn.q_proj.weight"] = np.clip(weight * 100, -127, 127).astype(np.int8)

    _edit_tensors(folder, quantize)
    return ["import-hf", "--hf", folder, "--workdir", tmp / "run"]


def fit_scaling_on_an_imported_run(assets, tmp):
    return ["fit-scaling", "--runs", assets / "imported", "--out", tmp / "fit"]


def export_over_an_existing_checkpoint(assets, tmp):
    shutil.copytree(assets / "hf", tmp / "out")
    return ["export-hf", "--workdir", assets / "imported", "--out", tmp / "out"]


def eval_with_a_missing_mc_file(assets, tmp):
    return ["eval", "--model", tmp / "never_loaded", "--mc", tmp / "nope.jsonl"]


def eval_with_a_missing_data_folder(assets, tmp):
    return ["eval", "--model", tmp / "never_loaded", "--data", tmp / "nope"]


def sweep_resume_of_an_old_record(assets, tmp):
    (tmp / "sweep").mkdir()
    (tmp / "sweep" / "sweep.json").write_text(json.dumps(
        {"config": "configs/demo.py", "base_overrides": [], "points": [{"train.seed": 0}]}))
    return ["sweep", "--resume", tmp / "sweep"]


def mistyped_override_value(assets, tmp):  # the absl form, with a bad value: the key is named
    return ["params", "--config", DEMO, "--config.model.num_heads", "3"]


def data_vocabulary_larger_than_the_model(assets, tmp):
    data = write_token_folder(tmp / "data", high=128)
    return ["train", "--config", DEMO, "--workdir", tmp / "run",
            *[f"--config.{item}" for item in tiny_run_overrides(data, model__vocab_size=64)]]


def a_run_that_trains_nothing(assets, tmp):
    data = write_token_folder(tmp / "data", high=128)
    # Not a bad input but a stop: the run is made (in dead/), trains two steps, and stops with one line.
    return ["train", "--config", DEMO, "--workdir", tmp / "dead",
            *[f"--config.{item}" for item in tiny_run_overrides(data, model__scale_emb=1e30,
                                                                train__dead_run_windows=2)]]


CASES = [  # (case, exit code, fragments the one line must hold)
    (config_syntax_error, 2, ["bad.py line 4", "invalid syntax"]),
    (config_name_error, 2, ["typo.py line 2", "NameError", "confg"]),
    (config_is_a_run_directory, 2, ["config file not found", "imported/config.json"]),
    (override_without_value, 2, ["--config.model.num_layers has no value", "--config.model.num_layers=VALUE"]),
    (parquet_without_text_column, 2, ["docs.parquet has no column 'text'", "body", "--text-field"]),
    (parquet_that_is_not_parquet, 2, ["docs.parquet is not a readable Parquet file"]),
    (bin_with_pickled_code, 2, ["pytorch_model.bin: refused", "never runs pickled code", "safetensors"]),
    (bin_that_is_a_raw_pickle, 2, ["pytorch_model.bin: refused", "never runs pickled code"]),
    (hf_config_value_of_the_wrong_type, 2, ["config.json: hidden_size='64' is a str", "must be an integer"]),
    (safetensors_header_corrupted, 2, ["model.safetensors is not a readable safetensors file"]),
    (shard_outside_the_folder, 2, ["model.safetensors.index.json: shard '../x'", "refused"]),
    (non_finite_weights, 2, ["model.safetensors: tensor model.layers.1.mlp.up_proj.weight", "2 non-finite"]),
    (int8_weights, 2, ["tensor model.layers.0.self_attn.q_proj.weight has dtype int8", "not supported"]),
    (fit_scaling_on_an_imported_run, 2, ["fit-scaling: error: no training runs under", "1 imported model(s) only"]),
    (export_over_an_existing_checkpoint, 2, ["already holds a checkpoint", "--overwrite"]),
    (eval_with_a_missing_mc_file, 2, ["nope.jsonl"]),
    (eval_with_a_missing_data_folder, 2, ["nope is not a prepared dataset"]),
    (sweep_resume_of_an_old_record, 2, ["sweep.json was written by an older minicpm-jax", "runs no stored code"]),
    (mistyped_override_value, 2, ["model.num_heads=3 must divide model.hidden_size=256"]),
    (data_vocabulary_larger_than_the_model, 2, ["was tokenized with a 128-token vocabulary, but model.vocab_size=64"]),
    (a_run_that_trains_nothing, 1, ["train: stopped: step 2: the gradient norm is exactly 0 for 2 log windows",
                                    "No checkpoint was saved yet"]),
]


def run_cli(capsys, argv) -> tuple[int, str, str]:
    code = cli.main([str(item) for item in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, expected_code: int, fragments) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert code == expected_code, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case, expected_code, fragments", CASES, ids=[case.__name__ for case, _, _ in CASES])
def test_a_user_mistake_is_one_line(case, expected_code, fragments, assets, tmp_path, capsys, monkeypatch):
    import minicpm_jax.cli.infer as infer_commands

    def no_model(args, need_tokenizer=True):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(infer_commands, "_load", no_model)
    argv = case(assets, tmp_path)
    code, _, err = run_cli(capsys, argv)
    line = assert_one_line(code, err, expected_code, fragments)
    assert "weights_only" not in line  # never the advice to unpickle code
    assert not (tmp_path / "run").exists() and not (tmp_path / "safe").exists()  # nothing half-made


def test_a_legacy_torch_file_of_tensors_converts(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "bin" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    code, _, err = run_cli(capsys, ["convert-bin", "--hf", tmp_path / "bin", "--out", tmp_path / "safe"])
    assert code == 0, err
    np.testing.assert_array_equal(load_file(tmp_path / "safe" / "model.safetensors")["w"], np.arange(4.0))


def test_verbose_keeps_the_traceback_anywhere_on_the_line(tmp_path):
    (tmp_path / "bad.py").write_text("def get_config(:\n")
    for argv in (["--verbose", "params", "--config", str(tmp_path / "bad.py")],
                 ["params", "--config", str(tmp_path / "bad.py"), "-v"]):
        with pytest.raises(ConfigError, match="bad.py line 1"):
            cli.main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import minicpm_jax.cli.run as run_commands

    def broken(args):
        raise KeyError("an internal key")

    monkeypatch.setattr(run_commands, "params", broken)  # register_commands binds the module's function
    with pytest.raises(KeyError, match="an internal key"):
        cli.main(["params", "--config", DEMO])


@pytest.mark.parametrize("raised, code, fragment", [
    (FloatingPointError("loss is nan at step 7; stopping. The last good checkpoint is step 4"), 1,
     "params: stopped: loss is nan at step 7; stopping. The last good checkpoint is step 4"),
    (KeyboardInterrupt(), 130, "params: interrupted"),
], ids=["nan-stop", "ctrl-c"])
def test_a_stop_exits_with_one_line(raised, code, fragment, monkeypatch, capsys):
    import minicpm_jax.cli.run as run_commands

    def stop(args):
        raise raised

    monkeypatch.setattr(run_commands, "params", stop)
    result, _, err = run_cli(capsys, ["params", "--config", DEMO])
    assert_one_line(result, err, code, [fragment])


def test_params_reads_a_run_config_json(assets, capsys):
    code, out, err = run_cli(capsys, ["params", "--config", assets / "imported" / "config.json"])
    assert code == 0, err
    assert "non-embedding parameters:" in out


def test_space_separated_overrides_work_like_the_equals_form(capsys):
    code, spaced, _ = run_cli(capsys, ["params", "--config", DEMO, "--config.model.num_layers", "2"])
    assert code == 0
    code, equals, _ = run_cli(capsys, ["params", "--config", DEMO, "--config.model.num_layers=2"])
    assert code == 0 and spaced == equals
    code, default, _ = run_cli(capsys, ["params", "--config", DEMO])
    assert default != spaced


def test_plan_exits_1_when_the_config_does_not_fit(capsys):
    base = ["plan", "--device", "v5e", "--devices", "1", "--estimate-only"]
    code, out, _ = run_cli(capsys, [*base, "--config", DEMO])
    assert code == 0 and "fits, margin" in out
    code, out, _ = run_cli(capsys, [*base, "--config", REPO / "configs" / "minicpm_2b.py"])
    assert code == 1 and "does NOT fit" in out


def test_fit_scaling_skips_an_imported_run_with_a_note(assets, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="minicpm_jax"):
        run_cli(capsys, ["fit-scaling", "--runs", assets / "imported", "--out", tmp_path / "fit"])
    assert "skipped: an imported model" in caplog.text


def test_lm_eval_checks_task_names_before_loading_the_model(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    import minicpm_jax.eval.lm_eval_adapter as adapter

    class Tasks:
        all_tasks = ["hellaswag", "arc_easy"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    monkeypatch.setattr(adapter, "MiniCPMJaxLM", no_model)
    code, _, err = run_cli(capsys, ["lm-eval", "--model", "nowhere", "--tasks", "arc_easy,hellaswg"])
    assert_one_line(code, err, 2, ["unknown lm_eval task(s) 'hellaswg' (did you mean hellaswag?)"])


def test_chat_quits_on_ctrl_c_without_a_traceback(monkeypatch, capsys):
    import minicpm_jax.cli.infer as infer_commands
    from minicpm_jax.infer import generate

    class Interrupted:
        def isatty(self):
            return False

        def readline(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(infer_commands, "_load", lambda args: (None, None))
    monkeypatch.setattr(generate, "ChatSession", lambda *args, **kwargs: object())
    monkeypatch.setattr(sys, "stdin", Interrupted())
    code, _, err = run_cli(capsys, ["chat", "--model", "anything"])
    assert code == 0 and err == ""


def test_chat_clamps_long_answers_to_the_context_with_one_note(tmp_path, caplog, monkeypatch):
    from types import SimpleNamespace

    from minicpm_jax.data.tokenizer import Tokenizer
    from minicpm_jax.infer import generate

    from data_helpers import train_small_tokenizer

    asked = []
    monkeypatch.setattr(generate, "generate_text", lambda model, tokenizer, prompts, **kw: (
        asked.append((len(prompts[0]), kw["max_new_tokens"])), ["an answer"])[1])
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    session = generate.ChatSession(model, Tokenizer(train_small_tokenizer(tmp_path)), max_new_tokens=2000)
    with caplog.at_level(logging.WARNING, logger="minicpm_jax"):
        session.send("hello")
        session.send("hello again")
    assert [prompt + new for prompt, new in asked] == [64, 64]  # every answer gets what the context leaves
    assert caplog.text.count("does not fit the model's context") == 1
    with pytest.raises(ValueError, match="fills the model's context of 64 tokens"):
        session.send("many words " * 40)


def test_the_mesh_error_on_cpu_says_how_to_fake_devices():
    import jax

    from minicpm_jax.config import MeshConfig
    from minicpm_jax.parallel.mesh import make_mesh

    needed = 2 * jax.device_count()
    with pytest.raises(ConfigError, match=f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"):
        make_mesh(MeshConfig(data=1, fsdp=1, expert=needed))


def test_a_resumed_sweep_runs_no_stored_code(tmp_path):
    from minicpm_jax.science import sweep as sweep_lib

    corpus = write_token_folder(tmp_path / "tokens")
    (tmp_path / "configs").mkdir()
    for name in ("demo.py", "base.py"):
        shutil.copy(REPO / "configs" / name, tmp_path / "configs" / name)
    sweep = sweep_lib.Sweep(str(tmp_path / "sweep"), str(tmp_path / "configs" / "demo.py"),
                            sweep_lib.grid({"train.seed": [0, 1]}), tiny_run_overrides(corpus))
    sweep.record()
    expected = [sweep.point_config(point).to_dict() for point in sweep.points]
    for name in ("demo.py", "base.py"):
        (tmp_path / "configs" / name).write_text("raise SystemExit('stored code ran')\n")
    resumed = sweep_lib.Sweep.load(str(tmp_path / "sweep"))
    assert [resumed.point_config(point).to_dict() for point in resumed.points] == expected
    resumed.record()  # the record matches itself
