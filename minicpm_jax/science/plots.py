"""The science PNGs: coordinate check, LR transfer, schedules over an lr grid, the batch-size law, the
scaling-law fit, D/N vs compute, loss envelopes, decay dynamics.

matplotlib (the `science` extra) is imported inside each function with the Agg backend (no display).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from minicpm_jax import storage


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: str) -> str:
    """Writes the figure to `png` (a local path or a URL) in one atomic write."""
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    fig.clf()
    storage.write_bytes(png, image.getvalue())
    return png


def plot_lr_transfer(curves: dict[str, dict[int, list[tuple[float, float]]]], png: str, ylabel: str) -> str:
    """One panel per parametrization: final loss vs lr, one curve per width, each curve's minimum marked.

    curves: parametrization -> width -> [(lr, loss)]; diverged points carry loss = nan and are drawn as x.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), sharey=True, squeeze=False)
    finite = [loss for by_width in curves.values() for pts in by_width.values() for _, loss in pts
              if np.isfinite(loss)]
    ceiling = max(finite) if finite else 1.0
    for ax, (name, by_width) in zip(axes[0], curves.items()):
        for width, points in sorted(by_width.items()):
            lrs, losses = map(np.array, zip(*sorted(points)))
            ok = np.isfinite(losses)
            line, = ax.plot(lrs[ok], losses[ok], "o-", label=f"width {width}")
            ax.plot(lrs[~ok], np.full((~ok).sum(), ceiling), "x", color=line.get_color())
            if ok.any():
                best = np.argmin(np.where(ok, losses, np.inf))
                ax.axvline(lrs[best], color=line.get_color(), ls=":", alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (schedule.peak_lr)")
        ax.set_title(f"{name}: loss vs lr per width (dotted: each width's best; x: diverged)")
        ax.legend()
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, png)


def plot_schedule_grid(losses: dict[str, dict[float, Sequence[float]]],
                       best_curves: dict[str, Sequence[Sequence[tuple[int, float]]]],
                       shapes: dict[str, Sequence[float]], png: str, title: str = "") -> str:
    """Left: final held-out loss vs peak lr per schedule (mean over seeds, bars from the seeds' min to max);
    middle: each schedule's lr relative to its peak; right: training loss at each schedule's best lr (the mean
    over seeds of the logged loss), over the second half of the run.

    losses: schedule -> lr -> per-seed losses; best_curves: schedule -> per-seed [(step, loss)];
    shapes: schedule -> lr/peak at steps 0, 1, ...
    """
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 5))
    names = list(losses)
    colors = {name: f"C{index}" for index, name in enumerate(names)}
    for index, name in enumerate(names):
        lrs = np.array(sorted(losses[name]))
        values = [np.asarray(losses[name][lr]) for lr in lrs]
        mean = np.array([v.mean() for v in values])
        spread = np.array([[m - v.min() for m, v in zip(mean, values)], [v.max() - m for m, v in zip(mean, values)]])
        shift = lrs * 1.04 ** (index - (len(names) - 1) / 2)  # side by side, so that the bars do not overlap
        left.errorbar(shift, mean, yerr=spread, fmt="o-", color=colors[name], capsize=3, label=name)
        best = int(np.argmin(mean))
        left.plot(shift[best], mean[best], "*", color=colors[name], ms=14)
    left.set(xscale="log", xlabel="peak learning rate", ylabel="held-out loss (nats/byte)",
             title="final held-out loss (mean; bars: min-max over seeds; star: best lr)")
    left.legend(fontsize=8)
    for name, shape in shapes.items():
        middle.plot(np.arange(len(shape)), shape, color=colors.get(name), label=name)
    middle.set(xlabel="step", ylabel="lr / peak lr", title="the schedules")
    middle.legend(fontsize=8)
    for name, runs in best_curves.items():
        steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
        by_step = [dict(run) for run in runs]
        mean = np.array([np.mean([curve[s] for curve in by_step]) for s in steps])
        keep = np.asarray(steps) >= steps[-1] / 2
        lr = min(losses[name], key=lambda lr: np.mean(losses[name][lr]))
        right.plot(np.asarray(steps)[keep], mean[keep], color=colors[name], label=f"{name}, lr {lr:g}")
    right.set(xlabel="step", ylabel="training loss (nats/byte, mean over seeds)",
              title="training loss at each schedule's best lr")
    right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, png)


def plot_batch_size_law(fit, png: str, paper_law=None, curves=None, ylabel: str = "loss") -> str:
    """Per model size: its loss curves (when `curves` {model: {bs: (tokens, loss)}} is given) and its equal-loss
    parabolas with their vertices; last column: the optima of every size pooled, the fitted line ± 1σ in b,
    each size's own line and the paper's law."""
    plt = _pyplot()
    models = list(fit.equal_loss_points)
    rows = 2 if curves else 1
    fig, axes = plt.subplots(rows, len(models) + 1, figsize=(4.6 * (len(models) + 1), 4.2 * rows), squeeze=False)
    label = lambda model: f"N = {int(model):,}" if str(model).isdigit() else str(model)
    cmap = plt.get_cmap("viridis")
    for col, model in enumerate(models):
        by_level = fit.equal_loss_points[model]
        levels = sorted(by_level)
        color = {level: cmap(i / max(len(levels) - 1, 1)) for i, level in enumerate(levels)}
        if curves:
            ax = axes[0][col]
            for bs, (tokens, losses) in sorted(curves[model].items()):
                ax.plot(tokens, losses, lw=1, label=f"bs {bs:g}")
            for level in levels:
                ax.axhline(level, color=color[level], lw=0.6, ls=":")
            ax.set(xscale="log", xlabel="tokens", ylabel=ylabel, title=f"{label(model)}: curves per batch size")
            ax.legend(fontsize=6)
        ax = axes[-1][col]
        vertices = {p.level: p for p in fit.points if p.model == model}
        for level in levels:
            points = by_level[level]
            if len(points) < 2:
                continue
            bs, tokens = map(np.array, zip(*points))
            kept = level in vertices
            ax.plot(bs, tokens, "o", mfc=color[level] if kept else "none", color=color[level],
                    label=f"L = {level:.3f}" + ("" if kept else " (no optimum)"))
            if len(points) >= 3:
                coeffs = np.polyfit(np.log(bs), np.log(tokens), 2)
                xs = np.linspace(np.log(bs.min()), np.log(bs.max()), 50)
                ax.plot(np.exp(xs), np.exp(np.polyval(coeffs, xs)), "-" if kept else ":", color=color[level],
                        alpha=0.7)
            if kept:
                ax.plot(vertices[level].batch_size, vertices[level].tokens, "*", ms=12, color=color[level],
                        mec="k")
        ax.set(xscale="log", yscale="log", xlabel="batch size (tokens per step)", ylabel="tokens to reach L",
               title=f"{label(model)}: equal-loss parabolas (*: vertex)")
        ax.legend(fontsize=6)
    ax = axes[0][-1]
    levels = np.array([p.level for p in fit.points])
    grid = np.geomspace(levels.min() * 0.97, levels.max() * 1.03, 50)
    for model in models:
        mine = [p for p in fit.points if p.model == model]
        if mine:
            line, = ax.plot([p.level for p in mine], [p.batch_size for p in mine], "o", label=label(model))
            if model in fit.per_model:
                own = fit.per_model[model].law
                ax.plot(grid, own.batch_size(grid), ":", color=line.get_color(), label=f"  own line b = {own.b:.2f}")
    pooled = fit.pooled
    err = f" ± {pooled.stderr_b:.2f}" if pooled.stderr_b is not None else ""
    ax.plot(grid, pooled.law.batch_size(grid), "k-", label=f"pooled: {pooled.law.a:.3g} / L^({pooled.law.b:.2f}{err})")
    if pooled.stderr_b is not None:  # the line pivots about the points' mean log L as b moves by ± 1σ
        centre = float(np.exp(np.mean(np.log(levels))))
        for sign in (-1, 1):
            b = pooled.law.b + sign * pooled.stderr_b
            ax.plot(grid, pooled.law.batch_size(centre) * (centre / grid) ** b, "k--", lw=0.6, alpha=0.6)
    if paper_law is not None:
        ax.plot(grid, paper_law.batch_size(grid), "r--",
                label=f"paper: {paper_law.a:.3g} / L^{paper_law.b:.2f} (C4 loss, its vocabulary)")
    ax.set(xscale="log", yscale="log", xlabel=f"loss level L ({ylabel})", ylabel="optimal batch size (tokens)",
           title="optimal batch size vs loss, all sizes pooled")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(np.round(np.geomspace(grid.min(), grid.max(), 5), 2)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    if rows == 2:
        axes[1][-1].axis("off")
    return _save(fig, png)


def compute_optimal_line(law, n_range: tuple[float, float], d_range: tuple[float, float],
                         num: int = 200) -> list[tuple[float, float]]:
    """The compute-optimal (N, D) of `law` over the budgets of the chart, only the points inside it: a fit with
    α ≈ 0 puts the line decades away, and a line drawn through off-chart points leaves the axes."""
    flops = np.geomspace(6 * n_range[0] * d_range[0], 6 * n_range[1] * d_range[1], num)
    optima = (law.compute_optimal(float(c)) for c in flops)
    return [(o.n_params, o.tokens) for o in optima
            if n_range[0] <= o.n_params <= n_range[1] and d_range[0] <= o.tokens <= d_range[1]]


def plot_scaling_fit(points: Sequence[Any], fit, png: str, curves: dict[int, tuple[Sequence, Sequence]] | None = None,
                     ylabel: str = "loss (nats/byte)") -> str:
    """Left: decayed losses vs tokens per model size with the fitted L(N, ·) (and the runs' loss curves);
    right: the fitted surface over (N, D) with the compute-optimal line."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = sorted({p.n_params for p in points})
    tokens_all = np.array([p.tokens for p in points], dtype=float)
    d_grid = np.geomspace(tokens_all.min() / 2, tokens_all.max() * 2, 100)
    for n in sizes:
        pts = sorted((p.tokens, p.best_loss_per_byte()) for p in points if p.n_params == n)
        line, = left.plot(*zip(*pts), "o", label=f"N = {n:,}")
        left.plot(d_grid, fit.law.loss(n, d_grid), "-", color=line.get_color(), alpha=0.7)
        if curves and n in curves:
            left.plot(*curves[n], color=line.get_color(), alpha=0.25, lw=1)
    law = fit.law
    left.set(xscale="log", xlabel="tokens D", ylabel=ylabel,
             title=f"L = {law.c_n:.3g}·N^-{law.alpha:.2f} + {law.c_d:.3g}·D^-{law.beta:.2f} + {law.l0:.3f}"
                   "  (N, D in 1e9)")
    left.legend(fontsize=8)

    n_grid = np.geomspace(min(sizes) / 4, max(sizes) * 4, 80)
    nn, dd = np.meshgrid(n_grid, d_grid)
    contour = right.contourf(nn, dd, law.loss(nn, dd), levels=20, cmap="viridis")
    fig.colorbar(contour, ax=right, label=ylabel)
    inside = compute_optimal_line(law, (n_grid.min(), n_grid.max()), (d_grid.min(), d_grid.max()))
    if len(inside) >= 2:
        right.plot(*zip(*inside), "w--", label="compute-optimal N, D")
    else:
        middle = law.compute_optimal(float(np.sqrt(6 * n_grid.min() * d_grid.min() * 6 * n_grid.max() * d_grid.max())))
        right.plot([], [], "w--", label=f"compute-optimal line off this chart (D/N = {middle.tokens_per_param:.2g} "
                                        f"at {middle.flops:.1e} FLOPs)")
    right.plot([p.n_params for p in points], [p.tokens for p in points], "r.", label="measured")
    right.set(xscale="log", yscale="log", xlim=(n_grid.min(), n_grid.max()), ylim=(d_grid.min(), d_grid.max()),
              xlabel="non-embedding parameters N", ylabel="tokens D", title="fitted L(N, D)")
    right.legend(fontsize=8)
    return _save(fig, png)


def plot_tokens_per_param(fitted: Sequence[dict], references: dict[str, tuple[str, Sequence[dict]]], png: str,
                          confidence: float | None = None, warned: bool = False) -> str:
    """Compute-optimal D/N vs compute: the fitted law (with its bootstrap band) and the reference laws, all through
    the same formula. Rows as scaling.tokens_per_param_table makes them; references: name -> (label, rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    flops = np.array([row["flops"] for row in fitted])
    label = "this fit" + (" (ill-conditioned: see warnings)" if warned else "")
    ax.plot(flops, [row["tokens_per_param"] for row in fitted], "o-", color="k", label=label)
    if fitted and "tokens_per_param_interval" in fitted[0]:
        lo, hi = zip(*(row["tokens_per_param_interval"] for row in fitted))
        ax.fill_between(flops, lo, hi, color="k", alpha=0.15, label=f"{confidence:.0%} bootstrap interval")
    for (text, rows), style in zip(references.values(), ("s--", "^:", "v-.")):
        ax.plot([r["flops"] for r in rows], [r["tokens_per_param"] for r in rows], style, label=text)
    ax.plot([5.76e23], [20.0], "*", ms=12, color="tab:red", label="Chinchilla model: 70B params on 1.4T tokens")
    # y limits: the references, widened to the fit and its band where they lie within 1e-2..1e5 tokens/param; a
    # degenerate fit beyond that range runs off the top or bottom rather than squashing the references flat.
    shown = [r["tokens_per_param"] for _, rows in references.values() for r in rows] + [20.0]
    for row in fitted:
        shown += [v for v in (row["tokens_per_param"], *row.get("tokens_per_param_interval", ()))
                  if np.isfinite(v) and 1e-2 <= v <= 1e5]
    ax.set_ylim(min(shown) / 2, max(shown) * 2)
    ax.set(xscale="log", yscale="log", xlabel="training compute C = 6·N·D (FLOPs)",
           ylabel="compute-optimal tokens per parameter D/N",
           title="compute-optimal D/N vs compute (each law through L = C_N·N^-α + C_D·D^-β + L0)")
    ax.legend(fontsize=7)
    return _save(fig, png)


def plot_envelopes(envelopes: dict[int, tuple[Sequence[float], Sequence[float], dict]], png: str,
                   ylabel: str = "loss (nats/byte)") -> str:
    """Decayed losses vs compute per model size with the power-law and exponential envelope fits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for n, (flops, losses, fits) in sorted(envelopes.items()):
        line, = ax.plot(flops, losses, "o", label=f"N = {n:,}")
        grid = np.geomspace(min(flops), max(flops), 100)
        for form, style in (("power", "-"), ("exponential", ":")):
            if form in fits:
                ax.plot(grid, fits[form].loss(grid), style, color=line.get_color(),
                        label=f"  {form} (rms {fits[form].rms_residual:.2g})")
    ax.set(xscale="log", xlabel="training FLOPs (6·N·D)", ylabel=ylabel,
           title="loss envelopes: power law (solid) vs exponential (dotted)")
    ax.legend(fontsize=7)
    return _save(fig, png)


def plot_dynamics(records: Sequence[dict[str, Any]], png: str, decay_start: int | None = None,
                  tensors: Sequence[str] = ()) -> str:
    """The decay-dynamics statistics of one run (train.log_update_stats; keys dyn/... of optim/update_stats.py):
    lr, losses, ‖g‖, cos(g_t+1, g_t), max|Δx|, |D₁|, D₂ and K on the fixed probe, all parameters (black)
    and each of `tensors` (tensor paths, coloured)."""
    plt = _pyplot()
    panels = [("lr", "learning rate", False), ("dyn/loss", "probe loss", False),
              ("dyn/grad_norm", "‖g‖ (probe)", True), ("dyn/grad_cosine", "cos(g_t+1, g_t)", False),
              ("dyn/update_max_abs", "max |x_t+1 − x_t|", True), ("dyn/d1", "|D₁|", True),
              ("dyn/d2", "D₂", False), ("dyn/curvature", "curvature K", True)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels)), sharex=True)
    steps = np.array([r["step"] for r in records])
    value = lambda key, absolute: np.array([abs(r.get(key, np.nan)) if absolute else r.get(key, np.nan)
                                            for r in records])
    for ax, (key, label, log) in zip(axes, panels):
        absolute = key == "dyn/d1"
        if key == "dyn/loss":
            train = [(r["step"], r["loss"]) for r in records if "loss" in r]
            if train:
                ax.plot(*zip(*train), lw=0.8, color="0.6", label="training (window mean)")
        ax.plot(steps, value(key, absolute), lw=1, color="k", label="all parameters")
        if key.startswith("dyn/") and key != "dyn/loss":
            for name in tensors:
                ax.plot(steps, value(f"{key}/{name}", absolute), lw=0.8, alpha=0.8, label=name)
        if key == "dyn/grad_cosine":
            ax.axhline(0, color="gray", lw=0.5)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        if decay_start is not None:
            ax.axvline(decay_start, color="gray", ls="--", lw=1)
    axes[1].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    axes[-1].set_xlabel("step (dashed: decay starts)")
    axes[0].set_title("decay dynamics on a fixed held-out probe batch")
    return _save(fig, png)


def plot_coord_check(sweeps: dict[str, Any], png: str, columns: int) -> str:
    """One panel per sweep (science/coord_check.Sweep, titled by its key): each activation's change after
    the first Adam steps vs the swept width or depth, log-log, on one shared y axis; flat curves = transfer."""
    plt = _pyplot()
    rows = -(-len(sweeps) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.8 * rows), sharey=True, squeeze=False)
    for ax, (title, sweep) in zip(axes.T.flat, sweeps.items()):  # column-major: one parametrization per column
        for name in sweep.names:
            ax.plot(sweep.values, sweep.curve(name), "o-", ms=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sweep.values, [str(v) for v in sweep.values])
        ax.set_xlabel(sweep.axis)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("RMS change per coordinate")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.T.flat)[len(sweeps):]:
        ax.set_visible(False)
    return _save(fig, png)
