"""Sweeps: grid points, shape pseudo-keys, the results table, and resuming after a crash skips finished points."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from minicpm_jax.config import ConfigError
from minicpm_jax.science import sweep as sweep_lib
from minicpm_jax.science.shapes import shape_settings
from minicpm_jax.train import loop as train_lib

from train_helpers import REPO, read_metrics, tiny_run_overrides, write_token_folder

DEMO = str(REPO / "configs" / "demo.py")


@pytest.fixture(autouse=True)
def _restore_compilation_cache():
    """A sweep points JAX's persistent compilation cache at its directory; keep that out of other tests."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "tokens", seed=0)


def test_grid_is_the_cartesian_product_with_readable_names():
    points = sweep_lib.grid({"width": [64, 128], "schedule.peak_lr": [0.01, 0.03]})
    assert [p.settings for p in points] == [
        {"width": 64, "schedule.peak_lr": 0.01}, {"width": 64, "schedule.peak_lr": 0.03},
        {"width": 128, "schedule.peak_lr": 0.01}, {"width": 128, "schedule.peak_lr": 0.03}]
    assert points[1].name == "width-64_schedule.peak_lr-0.03"


def test_width_pseudo_key_keeps_head_dim_ffn_ratio_and_gqa_group(corpus):
    # The tiny config: hidden 64, 2 heads (head_dim 32), 1 kv head (group 2), d_ff 160 (2.5·d).
    cfg = sweep_lib.point_config(DEMO, tiny_run_overrides(corpus), sweep_lib.SweepPoint({"width": 256}))
    model = cfg.model
    assert (model.hidden_size, model.intermediate_size, model.num_heads, model.num_kv_heads) == (256, 640, 8, 4)
    with pytest.raises(ConfigError, match="multiple of head_dim × GQA group = 32 × 2"):
        sweep_lib.point_config(DEMO, tiny_run_overrides(corpus), sweep_lib.SweepPoint({"width": 96}))


def test_shape_pseudo_key_gives_the_papers_9m_proxy(corpus):
    # The paper's Table 8 (docs/recipe.md §3.4): 9M is d_m 320, d_ff 800, 5 heads, 8 layers.
    assert shape_settings("9M") == {"hidden_size": 320, "intermediate_size": 800, "num_layers": 8,
                                    "num_heads": 5, "num_kv_heads": 5}
    cfg = sweep_lib.point_config(DEMO, tiny_run_overrides(corpus), sweep_lib.SweepPoint({"shape": "0.5B"}))
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads) == (1344, 24, 21)


def test_random_search_samples_inside_its_ranges():
    points = sweep_lib.random_search({"schedule.peak_lr": ("log", 1e-3, 1e-1), "model.init_std": ("choice", 0.05, 0.1)},
                                     samples=20, seed=3)
    assert len({p.name for p in points}) == 20
    assert all(1e-3 <= p.settings["schedule.peak_lr"] <= 1e-1 for p in points)
    assert {p.settings["model.init_std"] for p in points} == {0.05, 0.1}


def test_a_bad_point_fails_before_any_run_starts(corpus, tmp_path):
    points = sweep_lib.grid({"schedule.stable_steps": [6, 60]})  # 60 does not fit in train.steps=12
    with pytest.raises(ConfigError, match="exceeds train.steps"):
        sweep_lib.Sweep(str(tmp_path / "sweep"), DEMO, points, tiny_run_overrides(corpus)).record()
    assert not (tmp_path / "sweep" / "points").exists()


@pytest.mark.slow
def test_resumed_sweep_skips_finished_points_after_a_crash(corpus, tmp_path, monkeypatch):
    overrides = tiny_run_overrides(corpus, train__steps=6, schedule__stable_steps=2, schedule__decay_steps=2,
                                   checkpoint__every_steps=6, checkpoint__async_save=False)
    points = sweep_lib.grid({"schedule.peak_lr": [0.01, 0.02]})
    sweep_dir = tmp_path / "sweep"
    real_train = train_lib.train
    trained = []

    def crash_on_the_second_point(cfg, workdir):
        trained.append(Path(workdir).name)
        if len(trained) == 2:
            raise RuntimeError("simulated crash")
        return real_train(cfg, workdir)

    monkeypatch.setattr(train_lib, "train", crash_on_the_second_point)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep_lib.Sweep(str(sweep_dir), DEMO, points, overrides).run()
    first = sweep_dir / "points" / points[0].name
    assert (first / "result.json").is_file() and not (sweep_dir / "points" / points[1].name / "result.json").exists()
    first_result = (first / "result.json").read_text()

    # Resume from the recorded sweep: only the unfinished points train; the finished one is untouched.
    trained.clear()
    monkeypatch.setattr(train_lib, "train", lambda cfg, workdir: (trained.append(Path(workdir).name),
                                                                   real_train(cfg, workdir))[1])
    resumed = sweep_lib.Sweep.load(str(sweep_dir))
    resumed.run()
    assert trained == [points[1].name]
    assert (first / "result.json").read_text() == first_result

    rows = resumed.write_table()
    assert [row["settings"]["schedule.peak_lr"] for row in rows] == [0.01, 0.02]
    for row, point in zip(rows, points):
        assert row["status"] == "done" and row["step"] == 6 and row["tokens"] == 6 * 4 * 32
        assert row["loss"] == read_metrics(sweep_dir / "points" / point.name)[-1]["loss"]
        assert row["loss_per_byte"] == pytest.approx(row["loss"] / 3.0)  # the corpus has 3 bytes per token
    header = (sweep_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["schedule.peak_lr", "point", "status"]
    assert len((sweep_dir / "results.jsonl").read_text().splitlines()) == 2


def test_a_diverged_point_is_a_result_not_a_failure(corpus, tmp_path, monkeypatch):
    def diverge(cfg, workdir):
        raise FloatingPointError("loss is nan at step 3")

    monkeypatch.setattr(train_lib, "train", diverge)
    sweep = sweep_lib.Sweep(str(tmp_path / "sweep"), DEMO, sweep_lib.grid({"schedule.peak_lr": [10.0]}),
                            tiny_run_overrides(corpus))
    sweep.run()
    [row] = sweep.write_table()
    assert row["status"] == "diverged"
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["points"] == [{"schedule.peak_lr": 10.0}]


def test_another_sweep_in_the_same_directory_is_refused(corpus, tmp_path):
    overrides = tiny_run_overrides(corpus)
    sweep_lib.Sweep(str(tmp_path), DEMO, sweep_lib.grid({"train.seed": [0]}), overrides).record()
    with pytest.raises(ConfigError, match="already holds another sweep"):
        sweep_lib.Sweep(str(tmp_path), DEMO, sweep_lib.grid({"train.seed": [1]}), overrides).record()


def test_shards_split_the_points_between_processes(corpus, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(train_lib, "train", lambda cfg, workdir: trained.append(Path(workdir).name))
    monkeypatch.setattr(sweep_lib.results_lib, "read_run", lambda workdir: _NoResult())
    points = sweep_lib.grid({"train.seed": [0, 1, 2]})
    sweep = sweep_lib.Sweep(str(tmp_path), DEMO, points, tiny_run_overrides(corpus))
    sweep.run(shard=1, num_shards=2)
    assert trained == [points[1].name]
    sweep.run(shard=0, num_shards=2)
    assert trained[1:] == [points[0].name, points[2].name]
    assert len(sweep.table()) == 3


class _NoResult:
    def to_dict(self):
        return {}


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_resume_finishes_the_interrupted_point(corpus, tmp_path):
    import signal
    import subprocess
    import time

    from train_helpers import cli_command, losses_by_step

    steps = 120
    overrides = tiny_run_overrides(corpus, train__steps=steps, schedule__stable_steps=steps - 6,
                                   checkpoint__every_steps=steps)
    points = sweep_lib.grid({"schedule.peak_lr": [0.01, 0.02]})
    sweep_dir = tmp_path / "sweep"
    command = cli_command("sweep", "--config", DEMO, "--out", str(sweep_dir), "--grid", "schedule.peak_lr=0.01,0.02",
                          *[f"--config.{item}" for item in overrides])
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    first = sweep_dir / "points" / points[0].name
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (
            (first / "metrics.jsonl").exists() and len(read_metrics(first)) >= 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert f"sweep --resume {sweep_dir}" in stderr
    marker = json.loads((first / "interrupted.json").read_text())
    assert 5 <= marker["step"] < steps and marker["reason"] == "SIGINT received"
    assert not (first / "result.json").exists() and not (sweep_dir / "points" / points[1].name).exists()

    # Resumed: the interrupted point continues from its saved step (nothing re-run) and finishes; so does the other.
    sweep_lib.Sweep.load(str(sweep_dir)).run()
    assert not (first / "interrupted.json").exists()
    rows = sweep_lib.Sweep.load(str(sweep_dir)).table()
    assert [(row["status"], row["step"]) for row in rows] == [("done", steps), ("done", steps)]
    resumed = losses_by_step(first)
    assert sorted(resumed) == list(range(1, steps + 1))
    straight = tmp_path / "straight"
    sweep_lib.Sweep(str(straight), DEMO, points[:1], overrides).run()
    assert resumed == losses_by_step(straight / "points" / points[0].name)
