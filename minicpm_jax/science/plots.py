"""The science PNGs: coordinate check, LR transfer, batch-size law, scaling-law fit, loss envelopes, decay dynamics.

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


def plot_batch_size_law(fit, png: str, paper_law=None) -> str:
    """Left: equal-loss points and parabolas in (batch size, tokens); right: optimal batch size vs loss."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for level, points in fit.equal_loss_points.items():
        if len(points) < 2:
            continue
        bs, tokens = map(np.array, zip(*points))
        line, = left.plot(bs, tokens, "o", label=f"L = {level:.3f}")
        if len(points) >= 3:
            coeffs = np.polyfit(np.log(bs), np.log(tokens), 2)
            xs = np.linspace(np.log(bs.min()), np.log(bs.max()), 50)
            left.plot(np.exp(xs), np.exp(np.polyval(coeffs, xs)), "-", color=line.get_color(), alpha=0.6)
    left.set(xscale="log", yscale="log", xlabel="batch size (tokens per step)", ylabel="tokens to reach L",
             title="equal-loss points and their parabolas")
    left.legend(fontsize=8)
    levels = np.array(fit.levels)
    right.plot(levels, fit.optimal_batch_sizes, "o", label="parabola minima")
    grid = np.linspace(levels.min(), levels.max(), 50)
    right.plot(grid, fit.law.batch_size(grid), "-", label=f"fit: bs = {fit.law.a:.3g} / L^{fit.law.b:.2f}")
    if paper_law is not None:
        right.plot(grid, paper_law.batch_size(grid), "--", label=f"paper: {paper_law.a:.3g} / L^{paper_law.b:.2f}")
    right.set(xscale="log", yscale="log", xlabel="loss L", ylabel="optimal batch size (tokens)",
              title="optimal batch size vs loss")
    right.legend(fontsize=8)
    return _save(fig, png)


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
    flops = np.geomspace(6 * n_grid.min() * d_grid.min(), 6 * n_grid.max() * d_grid.max(), 40)
    optima = [law.compute_optimal(c) for c in flops]
    right.plot([o.n_params for o in optima], [o.tokens for o in optima], "w--", label="compute-optimal N, D")
    right.plot([p.n_params for p in points], [p.tokens for p in points], "r.", label="measured")
    right.set(xscale="log", yscale="log", xlim=(n_grid.min(), n_grid.max()), ylim=(d_grid.min(), d_grid.max()),
              xlabel="non-embedding parameters N", ylabel="tokens D", title="fitted L(N, D)")
    right.legend(fontsize=8)
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


def plot_dynamics(records: Sequence[dict[str, Any]], png: str, decay_start: int | None = None) -> str:
    """Per-step lr, grad norm, gradient cosine, update size and curvature of one run (log_update_stats)."""
    plt = _pyplot()
    panels = [("lr", "learning rate"), ("loss", "training loss"), ("grad_norm", "‖g‖"),
              ("grad_cosine", "cos(g_t+1, g_t)"), ("update_max_abs", "max |x_t+1 − x_t|"),
              ("curvature", "curvature K")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2 * len(panels)), sharex=True)
    steps = [r["step"] for r in records]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r.get(key, np.nan) for r in records], lw=1)
        ax.set_ylabel(label, fontsize=8)
        if decay_start is not None:
            ax.axvline(decay_start, color="gray", ls="--", lw=1)
    axes[-1].set_xlabel("step (dashed: decay starts)")
    axes[0].set_title("decay dynamics")
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
