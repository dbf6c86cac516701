"""Every shipped pod config at full size, compiled by XLA:TPU for its topology: memory and collectives.

For each config: the compiler's per-chip arguments + temporaries against the `plan` estimate, the
headroom on the chip, the compile time, and the bytes one chip sends in the step's collectives (ring
algorithms over each replica group, hlo_collectives) against the FSDP minimum (aot.fsdp_minimum_bytes).
Needs libtpu (`pip install -e '.[aot]'`), no TPU.
Compile times are this machine's (2 vCPUs here); print its CPU with them.

    python benchmarks/tpu_compile.py                      # all pod configs (minutes each)
    python benchmarks/tpu_compile.py --only minicpm_1b_v5e64.py
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from minicpm_jax import config  # noqa: E402
from minicpm_jax.parallel import aot
from minicpm_jax.parallel import memory as memory_plan

import _report

REPO = Path(__file__).resolve().parent.parent
# config file -> (topology, slices)
POD_CONFIGS = {
    "minicpm_1b_v5e64.py": ("v5e:8x8", 1),
    "minicpm_1b_v5e64x2.py": ("v5e:8x8", 2),
    "minicpm_2b_v5p128.py": ("v5p:4x4x4", 1),
    "minicpm_moe_8x2b_v5p128.py": ("v5p:4x4x4", 1),
    "minicpm_2b_128k_v5p128.py": ("v5p:4x4x4", 1),
}
GiB = 2 ** 30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", help="config file name(s) to compile (default: all)")
    parser.add_argument("--task", default="train", choices=aot.TASKS)
    args = parser.parse_args(argv)
    print(f"# XLA:TPU AOT compile on {_report.cpu_summary()}")
    print("| config | topology | mesh | compiler args + temp | plan estimate | plan / compiler | headroom | "
          "compile | sent per chip | FSDP minimum | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fits = True
    for name, (topology, slices) in POD_CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cfg = config.load(str(REPO / "configs" / name))
        result = aot.compile_step(cfg, topology, slices, args.task)
        estimate = memory_plan.estimate(cfg, result.num_devices, platform="tpu").total_bytes
        compiled = result.argument_bytes + result.temp_bytes
        mesh = " ".join(f"{axis}={n}" for axis, n in result.mesh_shape.items() if n > 1)
        minimum = result.fsdp_minimum_bytes
        ratio = f"{result.collectives.wire_bytes / minimum:.2f}×" if minimum else "–"
        print(f"| {name} | {slices} × {topology} | {mesh} | {compiled / GiB:.2f} GiB | {estimate / GiB:.2f} GiB | "
              f"{estimate / compiled:.2f} | {result.headroom:.0%} of {result.hbm_bytes / GiB:.2f} GiB | "
              f"{result.compile_seconds:.0f} s | {result.collectives.wire_bytes / GiB:.1f} GiB | "
              f"{minimum / GiB:.1f} GiB | {ratio} |", flush=True)
        fits &= result.headroom >= 0.10
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
