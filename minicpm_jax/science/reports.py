"""From run directories to fits, JSON reports and PNGs: what `fit-scaling`, `fit-batch-size` and `lr-transfer` do."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from minicpm_jax import storage
from minicpm_jax.files import write_json
from minicpm_jax.model import count_params
from minicpm_jax.run.checkpoint import CONFIG_FILE, read_run_config
from minicpm_jax.science import plots
from minicpm_jax.science.batch_size_law import PAPER_LAW, fit_batch_size_law
from minicpm_jax.science.results import RunResult, read_metrics, read_run
from minicpm_jax.science.scaling import (
    COMPUTE_GRID,
    REFERENCE_LAWS,
    bootstrap_scaling_law,
    diagnose,
    fit_envelopes,
    fit_scaling_law,
    tokens_per_param_table,
)
from minicpm_jax.science.sweep import Sweep, grid

log = logging.getLogger(__name__)


def find_runs(paths: Sequence[str]) -> list[str]:
    """Run directories among `paths`: each path is a run, or a folder searched for runs (sweeps, branch folders)."""
    found = []
    for path in paths:
        if not storage.is_dir(path):
            raise FileNotFoundError(f"{path} is not a directory")
        for root, dirs, files in storage.as_path(path).walk():
            dirs.sort()
            if CONFIG_FILE in files:
                found.append(os.fspath(root))
                dirs[:] = []  # a run's own subfolders (checkpoints, tensorboard) hold no runs
    if not found:
        raise FileNotFoundError(f"no run directories (with {CONFIG_FILE}) under {', '.join(paths)}")
    return found


def _trained(workdir: str) -> bool:
    """Whether `workdir` is a training run; an import-hf run (a model with no training config) is skipped, noted."""
    if "train" in read_run_config(workdir):
        return True
    log.warning("%s: skipped: an imported model (its config.json has no train section), not a training run", workdir)
    return False


# ----------------------------------------------------------------------------------------------- scaling

def scaling_report(paths: Sequence[str], out_dir: str, compute: float = 1e21, bootstrap: int = 1000,
                   seed: int = 0, confidence: float = 0.9, resample: str = "points") -> dict[str, Any]:
    """Fits L(N, D) to the decayed runs under `paths`; writes scaling_fit.json, scaling_fit.png, envelopes.png
    and tokens_per_param.png.

    Decayed runs (decay branches, or WSD/cosine runs that finished their decay) are points on the loss
    envelope; stable runs that never decayed are not, and only contribute their loss curves to the plot.
    `bootstrap` refits (0: none) of resampled points (`resample`: "points" or "residuals") give `confidence`
    percentile intervals of the constants and of D/N; the report's "warnings" say why the fit may not be
    trusted (scaling.diagnose), and are logged.
    """
    found = find_runs(paths)
    runs = [read_run(d) for d in found if _trained(d)]
    if not runs:
        raise FileNotFoundError(f"no training runs under {', '.join(paths)}: {len(found)} imported model(s) only")
    points = [r for r in runs if r.decayed and r.best_loss_per_byte() is not None]
    skipped = [r.workdir for r in runs if r not in points]
    for workdir in skipped:
        log.info("%s: not a finished decay, used for its loss curve only", workdir)
    n, d, y = [p.n_params for p in points], [p.tokens for p in points], [p.best_loss_per_byte() for p in points]
    fit = fit_scaling_law(n, d, y)
    boot = (bootstrap_scaling_law(n, d, y, fit, bootstrap, seed, confidence, resample) if bootstrap > 0
            else None)
    warnings = diagnose(fit, boot, compute)
    for warning in warnings:
        log.warning("ill-conditioned scaling fit: %s", warning)
    optimum = fit.law.compute_optimal(compute)
    grid = sorted({*COMPUTE_GRID, compute})
    envelopes, envelope_report = {}, {}
    for size in sorted(set(n)):
        mine = sorted((6.0 * size * p.tokens, p.best_loss_per_byte()) for p in points if p.n_params == size)
        if len(mine) < 4:
            envelope_report[str(size)] = f"{len(mine)} decayed points: an envelope comparison needs >= 4"
            continue
        flops, losses = zip(*mine)
        fits = fit_envelopes(flops, losses)
        envelopes[size] = (flops, losses, fits)
        envelope_report[str(size)] = {form: dataclasses.asdict(f) for form, f in fits.items()}
    curves = {r.n_params: _loss_curve(r) for r in runs if r.workdir in skipped}
    fitted_table = tokens_per_param_table(fit.law, grid, boot)
    references = {name: {"description": text, "constants": dataclasses.asdict(law),
                         "tokens_per_param_vs_compute": tokens_per_param_table(law, grid)}
                  for name, (law, text) in REFERENCE_LAWS.items()}
    report = {
        "fit": fit.to_dict(),
        "compute_optimal": dataclasses.asdict(optimum)
        | ({"tokens_per_param_interval": boot.tokens_per_param_interval(compute)} if boot and boot.laws else {}),
        "bootstrap": boot.to_dict(compute) if boot else None,
        "warnings": warnings,
        "tokens_per_param_vs_compute": fitted_table,
        "references": references,
        "envelopes": envelope_report,
        "points": [p.to_dict() | {"loss_per_byte_used": p.best_loss_per_byte()}
                   for p in points],
        "not_decayed": skipped,
    }
    write_json(storage.join(out_dir, "scaling_fit.json"), report, indent=1)
    plots.plot_scaling_fit(points, fit, storage.join(out_dir, "scaling_fit.png"),
                           {size: c for size, c in curves.items() if c[0]})
    plots.plot_tokens_per_param(fitted_table, {name: (REFERENCE_LAWS[name][1], ref["tokens_per_param_vs_compute"])
                                               for name, ref in references.items()},
                                storage.join(out_dir, "tokens_per_param.png"),
                                confidence=boot.confidence if boot else None, warned=bool(warnings))
    if envelopes:
        plots.plot_envelopes(envelopes, storage.join(out_dir, "envelopes.png"))
    return report


def _loss_curve(run: RunResult) -> tuple[list[float], list[float]]:
    """(tokens, loss per byte) along a run: held out where it evaluated (the fitted points' metric), else training."""
    cfg = read_run_config(run.workdir)
    per_step = cfg.train.global_batch_size * cfg.train.seq_len
    records = read_metrics(run.workdir)
    evals = [(r["step"] * per_step, r["eval_bits_per_byte"] * math.log(2)) for r in records if "eval_loss" in r]
    train = [(r["step"] * per_step, r["loss_per_byte"]) for r in records if "loss_per_byte" in r]
    points = evals or train
    return [t for t, _ in points], [loss for _, loss in points]


def format_scaling_report(report: dict[str, Any]) -> str:
    fit, optimum, boot = report["fit"], report["compute_optimal"], report.get("bootstrap")
    lines = [(f"L(N, D) = C_N·N^-α + C_D·D^-β + L0 over {fit['num_points']} decayed runs "
              f"(N, D in 1e9; rms residual {fit['rms_residual']:.3g} nats/byte)")]
    if boot:
        lines[0] += (f"; {boot['confidence']:.0%} intervals from {boot['num_samples'] - boot['failed']} bootstrap "
                     f"refits ({boot['method']}, seed {boot['seed']})")
    for name, value in fit["constants"].items():
        line = f"  {name:6s} {value:.4g} ± {fit['stderr'][name]:.2g}"
        if boot:
            lo, hi = boot["constants"][name]
            line += f"   [{lo:.3g}, {hi:.3g}]"
        lines.append(line)
    interval = optimum.get("tokens_per_param_interval")
    lines.append(f"compute-optimal at {optimum['flops']:.3g} FLOPs: N = {optimum['n_params']:.3g}, "
                 f"D = {optimum['tokens']:.3g}, D/N = {optimum['tokens_per_param']:.3g} tokens/param"
                 + (f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else ""))
    names = list(report["references"])
    lines.append("compute-optimal D/N (tokens per parameter) vs compute, C = 6·N·D:")
    lines.append(f"  {'FLOPs':>7s}  {'this fit':>22s}  " + "  ".join(f"{name:>22s}" for name in names))
    for i, row in enumerate(report["tokens_per_param_vs_compute"]):
        cell = f"{row['tokens_per_param']:.3g}"
        if "tokens_per_param_interval" in row:
            lo, hi = row["tokens_per_param_interval"]
            cell += f" [{lo:.3g}, {hi:.3g}]"
        refs = [report["references"][name]["tokens_per_param_vs_compute"][i]["tokens_per_param"] for name in names]
        lines.append(f"  {row['flops']:7.0e}  {cell:>22s}  " + "  ".join(f"{r:22.1f}" for r in refs))
    for warning in report["warnings"]:
        lines.append(f"WARNING (ill-conditioned fit): {warning}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- batch size

# Metrics a batch-size curve can be read from: metrics.jsonl keys, plus the held-out loss per byte derived from
# eval_bits_per_byte. The held-out ones are measured at the step itself; the training loss is a window mean.
HELD_OUT_METRICS = ("eval_loss", "eval_loss_per_byte")


def _metric_curve(workdir: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` along a run, finite values only; a ValueError names what is missing."""
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir}: no metrics.jsonl (or an empty one): the run never logged a step")
    key = "eval_bits_per_byte" if metric == "eval_loss_per_byte" else metric
    scale = math.log(2) if metric == "eval_loss_per_byte" else 1.0
    rows = [(r["step"], r[key] * scale) for r in records if key in r]
    if not rows:
        logged = sorted({k for r in records for k in r} - {"step"})
        hint = (" The held-out loss needs evaluations during training: set --config.train.eval_every_steps=K "
                "(and data.val_dir), or pass --metric loss for the lagging training loss."
                if metric in HELD_OUT_METRICS else "")
        raise ValueError(f"{workdir}: metrics.jsonl has no {key!r} (it logs {', '.join(logged)}).{hint}")
    finite = [(s, v) for s, v in rows if math.isfinite(v)]
    if len(finite) < 3:
        raise ValueError(f"{workdir}: only {len(finite)} finite {metric!r} value(s); a loss curve needs >= 3 "
                         f"(evaluate more often: train.eval_every_steps)")
    return [s for s, _ in finite], [v for _, v in finite]


def batch_size_report(paths: str | Sequence[str], out_dir: str, metric: str = "eval_loss",
                      levels: Sequence[float] | None = None) -> dict[str, Any]:
    """Fits bs = a/L^b to the runs under `paths` (run directories, sweeps, or folders of them), pooled over
    model sizes as the paper does; writes batch_size_law.json and batch_size_law.png.

    Each run is one curve, keyed by its model size N (non-embedding parameters) and its batch size in
    tokens (train.global_batch_size × train.seq_len). Where several runs share a key (e.g. an lr sweep),
    the one with the lowest final `metric` is used. `metric` defaults to the held-out loss (nats/token),
    the paper's C4 loss; `eval_loss_per_byte`, `loss` and `loss_per_byte` are the alternatives.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    best: dict[tuple[int, int], tuple[float, str, list[float], list[float]]] = {}
    for workdir in find_runs(paths):
        cfg = read_run_config(workdir)
        per_step = int(cfg.train.global_batch_size) * int(cfg.train.seq_len)
        steps, values = _metric_curve(workdir, metric)
        if steps[-1] < int(cfg.train.steps):
            log.warning("%s stopped at step %d of %d; its curve is used as far as it goes", workdir, steps[-1],
                        int(cfg.train.steps))
        key = (count_params(cfg.model), per_step)
        if key in best:
            log.info("N=%d, batch %d tokens: %s and %s; keeping the lower final %s", *key, best[key][1], workdir,
                     metric)
        if key not in best or values[-1] < best[key][0]:
            best[key] = (values[-1], workdir, [s * per_step for s in steps], values)
    curves: dict[str, dict[float, tuple[list[float], list[float]]]] = {}
    for (n_params, per_step), (_, _, tokens, values) in sorted(best.items()):
        curves.setdefault(str(n_params), {})[float(per_step)] = (tokens, values)
    fit = fit_batch_size_law(curves, levels)
    report = {"metric": metric, **fit.to_dict(),
              "batch_sizes": {model: sorted(by_batch) for model, by_batch in curves.items()},
              "runs": {f"{n}/{bs}": workdir for (n, bs), (_, workdir, _, _) in sorted(best.items())},
              "paper": {"a": PAPER_LAW.a, "b": PAPER_LAW.b}}
    write_json(storage.join(out_dir, "batch_size_law.json"), report, indent=1)
    plots.plot_batch_size_law(fit, storage.join(out_dir, "batch_size_law.png"), PAPER_LAW,
                              curves=curves, ylabel=metric)
    return report


# ------------------------------------------------------------------------------------------ LR transfer

def lr_transfer_sweep(sweep_dir: str, config_path: str, widths: Sequence[int], lrs: Sequence[float],
                      parametrizations: Sequence[str] = ("mup", "standard"),
                      base_overrides: Sequence[str] = ()) -> Sweep:
    """lr × width under each parametrization, as one sweep."""
    points = grid({"model.parametrization": list(parametrizations), "width": list(widths),
                   "schedule.peak_lr": list(lrs)})
    return Sweep(sweep_dir, config_path, points, base_overrides)


def final_loss(row: dict[str, Any]) -> float:
    """A point's final loss per byte (held out where evaluated at the end); nan when it diverged."""
    if row["status"] != "done":
        return math.nan
    result = RunResult(**{f.name: row[f.name] for f in dataclasses.fields(RunResult)})
    loss = result.best_loss_per_byte()
    return math.nan if loss is None else loss


def lr_transfer_report(sweep: Sweep, out_dir: str) -> dict[str, Any]:
    """Loss vs lr per width and parametrization; the best lr of each width and how far the optima drift."""
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for row in sweep.table():
        settings = row["settings"]
        curves.setdefault(settings["model.parametrization"], {}).setdefault(settings["width"], []).append(
            (settings["schedule.peak_lr"], final_loss(row)))
    report = {}
    for name, by_width in curves.items():
        best = {}
        for width, points in by_width.items():
            finite = [(loss, lr) for lr, loss in points if math.isfinite(loss)]
            if finite:
                best[width] = min(finite)[1]
        drift = math.log2(max(best.values()) / min(best.values())) if best else math.nan
        report[name] = {"best_lr_by_width": {str(w): lr for w, lr in sorted(best.items())},
                        "optimum_drift_octaves": drift,
                        "loss_by_width": {str(w): sorted(p) for w, p in sorted(by_width.items())}}
    write_json(storage.join(out_dir, "lr_transfer.json"), report, indent=1)
    plots.plot_lr_transfer(curves, storage.join(out_dir, "lr_transfer.png"), "final loss (nats/byte)")
    return report
