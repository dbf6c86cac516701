"""What the benchmarks end with: the CPU they ran on, for the report, and the JSON file they leave.

benchmarks/ is not a package: a benchmark run as `python benchmarks/NAME.py` (or imported with benchmarks/ on
sys.path, as the tests do) imports this module as `_report`.
"""

from __future__ import annotations

import os
import platform
from typing import Any

SIMD_FLAGS = ("avx512", "avx2", "amx")  # the CPU flags that decide XLA:CPU's and PyTorch's matmul speed


def _cpuinfo() -> list[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's model name ("unknown" where /proc/cpuinfo does not say)."""
    lines = _cpuinfo()
    if lines is None:
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def cpu_summary() -> str:
    """The CPU's model name, vCPU count and SIMD flags, e.g. 'AMD EPYC 7B13 (2 vCPUs; avx2)'."""
    lines = _cpuinfo() or []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{cpu_model()} ({os.cpu_count()} vCPUs; {' '.join(f for f in flags if f.startswith(SIMD_FLAGS))})"


def write_json(path: str | None, report: Any) -> None:
    """Writes the report to PATH with the package's JSON writer; no PATH (no --json given), nothing."""
    if path:
        from minicpm_jax.files import write_json  # here: a benchmark puts the checkout on sys.path first

        write_json(path, report)
