"""fit-scaling and fit-batch-size read real run-directory layouts: N from the config, D from the steps, the held-out
loss per byte at the last step; stable runs that never decayed are not fitted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_science_batch_size import _synthetic_curves

from minicpm_jax.model import count_params
from minicpm_jax.run.checkpoint import read_run_config, write_run_config
from minicpm_jax.science import reports
from minicpm_jax.science import sweep as sweep_lib
from minicpm_jax.science.batch_size_law import BatchSizeLaw
from minicpm_jax.science.scaling import ScalingLaw

from train_helpers import REPO, tiny_run_overrides, write_token_folder

DEMO = str(REPO / "configs" / "demo.py")
TOKENS_PER_STEP = 4 * 32  # the tiny config's batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "tokens", seed=0)


def _fake_run(workdir: Path, corpus: Path, width: int, steps: int, decay: int, records: list[dict],
              **settings) -> None:
    """A run directory as training leaves it (config.json, metrics.jsonl), without the training."""
    point = sweep_lib.SweepPoint({"width": width, "train.steps": steps, "schedule.stable_steps": steps - 2 - decay,
                                  "schedule.decay_steps": decay, **settings})
    write_run_config(str(workdir), sweep_lib.point_config(DEMO, tiny_run_overrides(corpus), point))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_fit_scaling_recovers_a_known_law_from_run_directories(corpus, tmp_path):
    truth = ScalingLaw(c_n=0.002, alpha=0.4, c_d=0.05, beta=0.35, l0=1.0)
    bytes_per_token = 3.0
    runs = tmp_path / "runs"
    for width in (64, 128, 256, 512):
        _fake_run(runs / f"d{width}" / "stable", corpus, width, 800, 0,
                  [{"step": 800, "loss": 9.0, "loss_per_byte": 3.0}])  # never decayed: not on the envelope
        for steps in (110, 220, 440, 880):
            workdir = runs / f"d{width}" / f"decay_{steps}"
            _fake_run(workdir, corpus, width, steps, steps // 11, [])
            n_params = count_params(read_run_config(str(workdir)).model)
            per_byte = float(truth.loss(n_params, steps * TOKENS_PER_STEP))
            (workdir / "metrics.jsonl").write_text(
                json.dumps({"step": steps, "loss": 99.0, "loss_per_byte": 33.0}) + "\n"
                + json.dumps({"step": steps, "eval_loss": per_byte * bytes_per_token,
                              "eval_bits_per_byte": per_byte / math.log(2)}) + "\n")
    report = reports.scaling_report([str(runs)], str(tmp_path / "fit"), compute=1e21, bootstrap=50)
    fitted = report["fit"]["constants"]
    for name in ("c_n", "alpha", "c_d", "beta", "l0"):
        assert fitted[name] == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert report["fit"]["num_points"] == 16
    assert sorted(Path(p).name for p in report["not_decayed"]) == ["stable"] * 4
    assert {p["tokens"] for p in report["points"]} == {s * TOKENS_PER_STEP for s in (110, 220, 440, 880)}
    assert report["compute_optimal"]["tokens_per_param"] == pytest.approx(
        truth.compute_optimal(1e21).tokens_per_param, rel=1e-2)
    assert set(report["envelopes"][str(n_params)]) == {"power", "exponential"}  # 4 decays per size: compared
    # Exact losses: every bootstrap refit returns the truth, so the intervals are points and nothing is flagged.
    assert report["warnings"] == []
    lo, hi = report["compute_optimal"]["tokens_per_param_interval"]
    assert lo == pytest.approx(truth.tokens_per_param(1e21), rel=1e-2) and hi == pytest.approx(lo, rel=1e-2)
    assert [row["flops"] for row in report["tokens_per_param_vs_compute"]] == [10.0 ** k for k in range(18, 25)]
    chinchilla = report["references"]["chinchilla_refit"]["tokens_per_param_vs_compute"]
    assert 15 < chinchilla[5]["tokens_per_param"] < 25  # 1e23 FLOPs
    assert "chinchilla_approach3" in report["references"] and "minicpm_paper_average" in report["references"]
    text = reports.format_scaling_report(report)
    assert "1e+24" in text and "WARNING" not in text
    for png in ("scaling_fit.png", "envelopes.png", "tokens_per_param.png"):
        assert (tmp_path / "fit" / png).stat().st_size > 10_000


def test_fit_scaling_warns_when_the_model_size_term_is_not_identified(corpus, tmp_path, capsys):
    """Losses that do not depend on N (the old evidence run's situation): fit-scaling prints and records warnings."""
    from minicpm_jax import cli

    runs, rng = tmp_path / "runs", np.random.default_rng(0)
    for width in (64, 128, 256):
        for steps in (110, 220, 440, 880):
            workdir = runs / f"d{width}" / f"decay_{steps}"
            _fake_run(workdir, corpus, width, steps, steps // 11, [])
            per_byte = 1.0 + 0.5 * (steps / 110) ** -0.4 + 0.003 * rng.standard_normal()
            (workdir / "metrics.jsonl").write_text(json.dumps(
                {"step": steps, "eval_loss": per_byte * 3.0, "eval_bits_per_byte": per_byte / math.log(2)}) + "\n")
    assert cli.main(["fit-scaling", "--runs", str(runs), "--out", str(tmp_path / "fit"), "--bootstrap", "40"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "fit" / "scaling_fit.json").read_text())
    assert report["warnings"] and "ill-conditioned" in printed
    assert all(w in printed for w in report["warnings"])
    assert any("alpha" in w or "c_n" in w for w in report["warnings"])


def _batch_sweep(corpus, tmp_path, law, rows, widths, metric_key="eval_loss"):
    """A sweep over batch size × width whose runs logged synthetic curves around `law` under `metric_key`,
    and a training loss 1 nat above (lagging) that the default metric must ignore."""
    sweep = sweep_lib.Sweep(str(tmp_path / "sweep"), DEMO,
                            sweep_lib.grid({"width": widths, "train.global_batch_size": rows}),
                            tiny_run_overrides(corpus, train__seq_len=32))
    sweep.record()
    for point in sweep.points:
        batch, width = point.settings["train.global_batch_size"], point.settings["width"]
        curves = _synthetic_curves(law, [r * 32 for r in rows], k=0.1, p=3.0, c=1e6 * (1 + widths.index(width)))
        workdir = Path(sweep.point_dir(point))
        tokens, losses = curves[float(batch * 32)]
        steps = np.arange(1, int(tokens.max() / (batch * 32)))
        step_losses = np.interp(steps * batch * 32, tokens, losses)
        _fake_run(workdir, corpus, width, 12, 4,
                  [{"step": int(s), metric_key: float(v), "loss": float(v) + 1.0} for s, v in zip(steps, step_losses)],
                  **{k: v for k, v in point.settings.items() if k != "width"})
        (workdir / "result.json").write_text(json.dumps({"status": "done", "workdir": str(workdir),
                                                         "settings": point.settings}))
    return sweep


def test_fit_batch_size_pools_the_model_sizes_of_a_sweep_on_the_held_out_loss(corpus, tmp_path):
    law = BatchSizeLaw(a=13824.0, b=3.0)  # optimum 512 tokens per step at L = 3
    sweep = _batch_sweep(corpus, tmp_path, law, [4, 8, 16, 32, 64], [64, 128])
    report = reports.batch_size_report(sweep.dir, str(tmp_path / "law"), levels=[2.8, 3.0, 3.2, 3.4])
    assert report["metric"] == "eval_loss"
    assert report["b"] == pytest.approx(3.0, rel=0.05)
    assert report["a"] == pytest.approx(13824.0, rel=0.15)
    assert len(report["batch_sizes"]) == 2 and report["pooled"]["num_points"] == 8  # 2 sizes × 4 levels
    assert report["pooled"]["stderr_b"] < 0.2 and len(report["per_model"]) == 2
    assert (tmp_path / "law" / "batch_size_law.png").stat().st_size > 10_000


def test_fit_batch_size_command_prints_the_pooled_law_and_each_sizes_line(corpus, tmp_path, capsys):
    from minicpm_jax import cli

    sweep = _batch_sweep(corpus, tmp_path, BatchSizeLaw(a=13824.0, b=3.0), [4, 8, 16, 32, 64], [64, 128])
    assert cli.main(["fit-batch-size", "--sweep", sweep.dir, "--levels", "2.8,3.0,3.2,3.4"]) == 0
    out = capsys.readouterr().out
    assert "from 8 optima over 2 model size(s)" in out and "leave-one-run-out" in out
    assert out.count("its own line b = ") == 2
    assert (Path(sweep.dir) / "batch_size_law" / "batch_size_law.json").is_file()


def test_fit_batch_size_names_the_run_that_lacks_the_metric(corpus, tmp_path):
    sweep = _batch_sweep(corpus, tmp_path, BatchSizeLaw(a=13824.0, b=3.0), [4, 8, 16], [64], metric_key="other")
    with pytest.raises(ValueError, match=r"points/.*metrics.jsonl has no 'eval_loss'.*eval_every_steps"):
        reports.batch_size_report(sweep.dir, str(tmp_path / "law"))
    report = reports.batch_size_report(sweep.dir, str(tmp_path / "law"), metric="other", levels=[3.2, 3.4])
    assert report["pooled"]["num_points"] == 2


@pytest.mark.parametrize("settings,decayed", [
    ({"schedule.name": "cosine"}, True),  # T = S: at the floor at the end
    ({"schedule.name": "cosine", "schedule.cosine_steps": 1.25}, False),  # T = 1.25·S: the run ends above it
    ({"schedule.name": "cosine", "schedule.cosine_steps": 30}, True),  # T < S: held at the floor since step 30
    ({"schedule.name": "cosine_loop", "schedule.cosine_steps": 21}, True),  # W 2, period 19: cycles end at 21, 40
    ({"schedule.name": "cosine_loop", "schedule.cosine_steps": 32}, False),  # cycles end at 32, 62: mid-cycle
])
def test_a_cosine_run_counts_as_decayed_only_at_its_floor(corpus, tmp_path, settings, decayed):
    from minicpm_jax.science.results import read_run

    _fake_run(tmp_path, corpus, 64, 40, 0, [{"step": 40, "loss": 3.0, "loss_per_byte": 1.0}],
              **{"schedule.warmup_steps": 2, "schedule.stable_steps": 0, **settings})
    assert read_run(str(tmp_path)).decayed is decayed
