"""Science subcommands: sweep, lr-transfer, coord-check, fit-batch-size, fit-scaling."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("minicpm_jax")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    shard, shards = int(index), int(count)
    if not 0 <= shard < shards:
        raise argparse.ArgumentTypeError(f"--shard {text}: expected i/k with 0 <= i < k")
    return shard, shards


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="grid or random search of short runs; final losses in one table")
    p.add_argument("--config", help="base config file (for a new sweep)")
    p.add_argument("--out", help="new sweep directory")
    p.add_argument("--resume", metavar="SWEEP", help="continue a sweep directory (finished points are skipped)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="grid axis (repeat); keys are config keys or the pseudo-keys shape=9M,30M / width=D")
    p.add_argument("--random", action="append", default=[], metavar="KEY=log:LO:HI",
                   help="random-search dimension (repeat): log:LO:HI, linear:LO:HI or choice:A,B")
    p.add_argument("--samples", type=int, default=8, help="random-search points (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random-search seed")
    p.add_argument("--processes", type=int, default=1, help="split the points over this many processes")
    p.add_argument("--shard", type=_shard, default=(0, 1), help=argparse.SUPPRESS)  # i/k, set by --processes
    p.set_defaults(func=sweep, accepts_config_overrides=True)

    p = subparsers.add_parser("lr-transfer", help="lr × width sweep under μP and standard parametrization, "
                                                  "plotted (docs/recipe.md §3)")
    p.add_argument("--config", default="configs/windtunnel.py", help="base config (default configs/windtunnel.py)")
    p.add_argument("--out", required=True, help="sweep directory (resumable)")
    p.add_argument("--widths", type=_ints, default=[64, 128, 256], help="hidden sizes, e.g. 64,128,256")
    p.add_argument("--lrs", type=_floats, default=[0.001, 0.003, 0.01, 0.03, 0.1], help="peak lrs")
    p.add_argument("--parametrizations", default="mup,standard", help="mup,standard (default both)")
    p.add_argument("--processes", type=int, default=1, help="split the points over this many processes")
    p.set_defaults(func=lr_transfer, accepts_config_overrides=True)

    p = subparsers.add_parser("coord-check", help="μP coordinate check: each activation's change in the first Adam "
                                                  "steps across widths and depths, plotted (docs/recipe.md §3.5)")
    p.add_argument("--config", default="configs/windtunnel.py",
                   help="config whose model section is checked (default configs/windtunnel.py)")
    p.add_argument("--out", required=True, help="output folder for coord_check.json and the PNGs")
    p.add_argument("--widths", type=_ints, default=[64, 128, 256, 512], help="hidden sizes (default 64,128,256,512)")
    p.add_argument("--num-layers", type=int, default=2, help="depth of the width sweeps (default 2)")
    p.add_argument("--depths", type=_ints, default=[2, 4, 8, 16],
                   help="depths, at the config's width (default 2,4,8,16; '' skips the depth sweep)")
    p.add_argument("--depth-base", type=int, default=2,
                   help="also sweep depths with the depth-μP lr rule model.num_layers_base=N (default 2; 0: not)")
    p.add_argument("--parametrizations", default="mup,standard_fanin", help="default mup,standard_fanin")
    p.add_argument("--steps", type=int, default=5, help="Adam steps on the fixed batch (default 5)")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate (default 0.01, the paper's)")
    p.add_argument("--seeds", type=int, default=3, help="init seeds averaged per point (default 3)")
    p.set_defaults(func=coord_check, accepts_config_overrides=True)

    p = subparsers.add_parser("fit-batch-size", help="fit bs = a/L^b from runs over batch sizes and model sizes")
    p.add_argument("--runs", "--sweep", nargs="+", required=True, dest="runs",
                   help="run directories, sweeps, or folders holding them: one run per (model size, batch size)")
    p.add_argument("--out", help="output folder (default RUNS[0]/batch_size_law)")
    p.add_argument("--metric", default="eval_loss",
                   help="curve to read: eval_loss (held out, nats/token; default) | eval_loss_per_byte | loss | "
                        "loss_per_byte (the training loss is a mean over the log window: it lags)")
    p.add_argument("--levels", type=_floats,
                   help="loss levels for every model size (default: 6 per size, from the lowest loss 3 of its "
                        "batch sizes reach upwards)")
    p.set_defaults(func=fit_batch_size)

    p = subparsers.add_parser("fit-scaling", help="fit L(N, D) to decay branches of stable runs of several sizes")
    p.add_argument("--runs", nargs="+", required=True,
                   help="run directories, or folders holding them (stable runs and their decay branches)")
    p.add_argument("--out", required=True, help="output folder for scaling_fit.json and the PNGs")
    p.add_argument("--compute", type=float, default=1e21, help="FLOPs for the compute-optimal split (1e21)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap refits for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--confidence", type=float, default=0.9, help="percentile interval (0.9: 5th-95th)")
    p.add_argument("--resample", choices=("points", "residuals"), default="points",
                   help="bootstrap by resampling the decayed runs (points) or the fit's residuals on the fixed design")
    p.set_defaults(func=fit_scaling)


def sweep(args: argparse.Namespace) -> None:
    from minicpm_jax.config import ConfigError
    from minicpm_jax.science import sweep as sweep_lib

    if args.resume:
        if args.config or args.grid or args.random or args.config_overrides:
            raise ConfigError("--resume continues a recorded sweep; give no --config, --grid, --random or overrides")
        spec = sweep_lib.Sweep.load(args.resume)
    else:
        if not (args.config and args.out and (args.grid or args.random)):
            raise ConfigError("a new sweep needs --config, --out and at least one --grid or --random")
        points = sweep_lib.grid(dict(map(sweep_lib.parse_axis, args.grid))) if args.grid else []
        if args.random:
            space = dict(map(sweep_lib.parse_dimension, args.random))
            sampled = sweep_lib.random_search(space, args.samples, args.seed)
            # A grid and a random search combine: every grid point with every sampled point.
            points = [sweep_lib.SweepPoint({**g.settings, **r.settings}) for g in points or [sweep_lib.SweepPoint({})]
                      for r in sampled]
        spec = sweep_lib.Sweep(args.out, args.config, points, args.config_overrides)
    shard, shards = args.shard
    if shards > 1:
        spec.run(shard, shards)
        return
    sweep_lib.run_points(spec, args.processes)
    rows = spec.write_table()
    print(f"{len(rows)}/{len(spec.points)} points finished; table in {spec.dir}/results.jsonl and results.csv")


def lr_transfer(args: argparse.Namespace) -> None:
    from minicpm_jax.science import reports
    from minicpm_jax.science import sweep as sweep_lib

    spec = reports.lr_transfer_sweep(args.out, args.config, args.widths, args.lrs,
                                     [p.strip() for p in args.parametrizations.split(",")], args.config_overrides)
    sweep_lib.run_points(spec, args.processes)
    spec.write_table()
    report = reports.lr_transfer_report(spec, args.out)
    for name, result in report.items():
        print(f"{name}: best lr by width {result['best_lr_by_width']}, optima spread over "
              f"{result['optimum_drift_octaves']:.1f} octaves")
    print(f"plot: {args.out}/lr_transfer.png")


def coord_check(args: argparse.Namespace) -> None:
    from minicpm_jax import config as config_lib
    from minicpm_jax.config import ModelConfig
    from minicpm_jax.science import coord_check as coord_lib

    base = ModelConfig.from_config(config_lib.load(args.config, overrides=args.config_overrides).model)
    report = coord_lib.coord_check(base, args.out, args.widths, args.depths,
                                   [p.strip() for p in args.parametrizations.split(",")], args.num_layers,
                                   args.depth_base, steps=args.steps, lr=args.lr, seeds=tuple(range(args.seeds)))
    print(coord_lib.format_report(report))
    print(f"report and plots in {args.out} (coord_check.json, coord_check.png, coord_check_depth.png)")


def fit_batch_size(args: argparse.Namespace) -> None:
    from minicpm_jax import storage
    from minicpm_jax.science import reports

    out = args.out or storage.join(args.runs[0], "batch_size_law")
    report = reports.batch_size_report(args.runs, out, args.metric, args.levels)
    pooled = report["pooled"]
    err = f" ± {pooled['stderr_b']:.2f}" if pooled["stderr_b"] is not None else " (no error bar: 2 points)"
    if report["jackknife_stderr_b"] is not None:
        err += f" (leave-one-run-out: ± {report['jackknife_stderr_b']:.2f})"
    print(f"bs = {report['a']:.4g} / L^{report['b']:.3f}{err} (tokens per step, L = {args.metric}) from "
          f"{pooled['num_points']} optima over {len(report['batch_sizes'])} model size(s); paper: 1.21e9 / L^6.24")
    for model, line in report["per_model"].items():
        print(f"  N = {model}: its own line b = {line['b']:.3f} over {line['num_points']} optima")
    for model, levels in report["skipped"].items():
        for level, why in levels.items():
            print(f"  N = {model}, L = {float(level):.4g}: no optimum ({why})")
    print(f"plot: {out}/batch_size_law.png")


def fit_scaling(args: argparse.Namespace) -> None:
    from minicpm_jax.science import reports

    report = reports.scaling_report(args.runs, args.out, args.compute, args.bootstrap, args.seed,
                                    args.confidence, args.resample)
    print(reports.format_scaling_report(report))
    for size, envelope in report["envelopes"].items():
        print(f"envelope N={size}: " + (envelope if isinstance(envelope, str) else json.dumps(
            {form: round(fit["rms_residual"], 5) for form, fit in envelope.items()}) + " (rms residual)"))
    if report["warnings"]:
        print(f"the fit is ill-conditioned ({len(report['warnings'])} warnings above): its constants and D/N are "
              f"not determined by these runs")
    print(f"report and plots in {args.out}")
