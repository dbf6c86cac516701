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
    report = reports.scaling_report([str(runs)], str(tmp_path / "fit"), compute=1e21)
    fitted = report["fit"]["constants"]
    for name in ("c_n", "alpha", "c_d", "beta", "l0"):
        assert fitted[name] == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert report["fit"]["num_points"] == 16
    assert sorted(Path(p).name for p in report["not_decayed"]) == ["stable"] * 4
    assert {p["tokens"] for p in report["points"]} == {s * TOKENS_PER_STEP for s in (110, 220, 440, 880)}
    assert report["compute_optimal"]["tokens_per_param"] == pytest.approx(
        truth.compute_optimal(1e21).tokens_per_param, rel=1e-2)
    assert set(report["envelopes"][str(n_params)]) == {"power", "exponential"}  # 4 decays per size: compared
    for png in ("scaling_fit.png", "envelopes.png"):
        assert (tmp_path / "fit" / png).stat().st_size > 10_000


def test_fit_batch_size_reads_the_curves_of_a_sweep(corpus, tmp_path):
    law = BatchSizeLaw(a=13824.0, b=3.0)  # optimum 512 tokens per step at L = 3
    rows = [4, 8, 16, 32, 64]
    sweep = sweep_lib.Sweep(str(tmp_path / "sweep"), DEMO, sweep_lib.grid({"train.global_batch_size": rows}),
                            tiny_run_overrides(corpus, train__seq_len=32))
    sweep.record()
    curves = _synthetic_curves(law, [r * 32 for r in rows], k=0.1, p=3.0, c=1e6)
    for point, batch in zip(sweep.points, rows):
        workdir = Path(sweep.point_dir(point))
        tokens, losses = curves[float(batch * 32)]
        steps = np.arange(1, int(tokens.max() / (batch * 32)))
        step_losses = np.interp(steps * batch * 32, tokens, losses)
        _fake_run(workdir, corpus, 64, 12, 4, [{"step": int(s), "loss": float(v)} for s, v in zip(steps, step_losses)],
                  **point.settings)
        (workdir / "result.json").write_text(json.dumps({"status": "done", "workdir": str(workdir),
                                                         "settings": point.settings}))
    report = reports.batch_size_report(sweep.dir, str(tmp_path / "law"), levels=[2.8, 3.0, 3.2, 3.4])
    assert report["b"] == pytest.approx(3.0, rel=0.05)
    assert report["a"] == pytest.approx(13824.0, rel=0.15)
    assert (tmp_path / "law" / "batch_size_law.png").stat().st_size > 10_000


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
