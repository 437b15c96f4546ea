"""The paper's figures from the tidy frames: one colour per model size, one marker per patch size, log axes where
the paper uses them. Sizes take their colours, and presets their legend places, in order of compute (Gflops), so
any family of sizes plots without a list of names. Each figure is written as PNG and SVG; functions return the PNG
path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

MARKERS = {1: "P", 2: "o", 4: "s", 8: "^", 16: "D"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def size_colours(frame: pd.DataFrame) -> dict[str, tuple]:
    """A distinct colour per model size (tab10), given in order of the sizes' compute (mean log Gflops)."""
    palette = _plt().get_cmap("tab10")
    by_compute = np.log(frame["gflops"]).groupby(frame["size"]).mean().sort_values().index
    return {size: palette(i % 10) for i, size in enumerate(by_compute)}


def _curves(axes: list, frame: pd.DataFrame, xs: list[str], y: str, **style) -> None:
    """One line per preset, in order of its Gflops (colour: its size, marker: its patch), of `y` against `xs[k]` on
    `axes[k]`."""
    colours = size_colours(frame)
    dashes = variant_styles(frame)
    order = frame.groupby("label")["gflops"].first().sort_values().index
    groups = dict(tuple(frame.groupby("label")))
    for label in order:
        rows = groups[label].sort_values("step")
        look = dict(color=colours[rows["size"].iloc[0]], marker=MARKERS.get(int(rows["patch"].iloc[0]), "o"), **style)
        look["linestyle"] = dashes[rows["variant"].iloc[0]]
        for ax, x in zip(axes, xs):
            ax.plot(rows[x], rows[y], label=label, **look)
            if f"{y}_min" in rows and (rows.get("seeds", 1) > 1).any():  # the spread over seeds
                ax.fill_between(rows[x], rows[f"{y}_min"], rows[f"{y}_max"], color=look["color"], alpha=0.15, lw=0)


def variant_styles(frame: pd.DataFrame) -> dict[str, str]:
    """A line style per variant, in order of first appearance."""
    styles = ["-", "--", ":", "-."]
    return {v: styles[i % len(styles)] for i, v in enumerate(dict.fromkeys(frame["variant"]))}


def _save(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", dpi=150, bbox_inches="tight")
    _plt().close(fig)
    return str(out / f"{name}.png")


def fid_vs_steps(frame: pd.DataFrame, out: Path, metric: str = "fid") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _curves([ax], frame, ["step"], metric)
    ax.set(xlabel="training steps", ylabel=metric.upper(), title=f"{metric.upper()} over training")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, f"{metric}_vs_steps")


def fid_vs_gflops(
    at_step: pd.DataFrame, out: Path, step: int, fit=None, samples=None, corr=None, paper=None, metric: str = "fid"
) -> str:
    """The paper's Figure 8: FID (or another `metric`, e.g. fd_dinov2) against Gflops at one training step, with
    the fitted power law and its band."""
    plt = _plt()
    name = {"fid": "FID", "fd_dinov2": "FD_DINOv2"}.get(metric, metric)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = size_colours(at_step)
    for _, row in at_step.iterrows():
        ax.scatter(
            row["gflops"],
            row[metric],
            s=60,
            color=colours[row["size"]],
            marker=MARKERS.get(row["patch"], "o"),
            edgecolor="black",
            zorder=3,
        )
        if row.get("seeds", 1) > 1:  # mean of the seeds, bar from the lowest to the highest
            span = [[row[metric] - row[f"{metric}_min"]], [row[f"{metric}_max"] - row[metric]]]
            ax.errorbar(row["gflops"], row[metric], yerr=span, color="black", lw=1, capsize=3, zorder=2)
        ax.annotate(
            row["label"].removeprefix("DiT-"),
            (row["gflops"], row[metric]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if fit is not None:
        xs = np.geomspace(at_step["gflops"].min() / 1.5, at_step["gflops"].max() * 1.5, 100)
        band = fit.band(xs, samples) if samples is not None and len(samples) else None
        label = f"{name} = {fit.a:.3g} * Gflops^{fit.b:.3f} [{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]"
        _fitted(ax, xs, fit(xs), label, band)
    if paper is not None:
        ax.scatter(paper["gflops"], paper["fid"], marker="x", color="grey", label="paper, 400K steps", zorder=2)
    title = f"{name} vs Gflops at step {step:,}"
    if corr is not None:
        title += f"  (r = {corr.pearson:.2f} with log Gflops)"
    ax.set(xscale="log", yscale="log", xlabel="forward Gflops (paper convention)", ylabel=name, title=title)
    ax.grid(alpha=0.3, which="both")
    if fit is not None or paper is not None:
        ax.legend(fontsize=7)
    return _save(fig, out, f"{metric}_vs_gflops")


def fid_vs_compute(frame: pd.DataFrame, out: Path, fit=None) -> str:
    """The paper's Figure 9: FID against training compute for every scored checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _curves([ax], frame, ["compute_flops"], "fid")
    if fit is not None:
        xs = np.geomspace(frame["compute_flops"].min(), frame["compute_flops"].max(), 100)
        ax.plot(xs, fit(xs), "k--", lw=1, label=f"frontier: FID ~ C^{fit.b:.3f}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training compute (FLOPs, 6 x MACs x images)",
        ylabel="FID",
        title="FID vs training compute",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "fid_vs_compute")


def loss_curves(curves: pd.DataFrame, out: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _curves(axes, curves, ["step", "compute_flops"], "loss", markersize=3)
    axes[0].set(xlabel="training steps", ylabel="training loss", yscale="log", title="loss over training")
    axes[1].set(
        xlabel="training compute (FLOPs)",
        ylabel="training loss",
        xscale="log",
        yscale="log",
        title="loss vs training compute",
    )
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return _save(fig, out, "loss_curves")


def variants_fid_vs_gflops(at_step: pd.DataFrame, out: Path, step: int, fits: dict) -> str:
    """FID against Gflops with one colour, one fitted line and one band per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    palette = plt.get_cmap("tab10")
    xs = np.geomspace(at_step["gflops"].min() / 1.5, at_step["gflops"].max() * 1.5, 100)
    for i, (variant, rows) in enumerate(at_step.groupby("variant")):
        colour = palette(i % 10)
        for _, row in rows.iterrows():
            ax.scatter(row["gflops"], row["fid"], s=50, color=colour, marker=MARKERS.get(row["patch"], "o"),
                       edgecolor="black", zorder=3)  # fmt: skip
        label = variant
        if variant in fits:
            fit, samples = fits[variant]
            label = f"{variant}: FID = {fit.a:.3g} * Gflops^{fit.b:.3f} [{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]"
            ax.plot(xs, fit(xs), color=colour, lw=1.3, label=label)
            if samples is not None and len(samples):
                lo, hi = fit.band(xs, samples)
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.12)
        else:
            ax.scatter([], [], color=colour, label=f"{variant} (no fit)")
    ax.set(xscale="log", yscale="log", xlabel="forward Gflops (paper convention)", ylabel="FID",
           title=f"FID vs Gflops by variant at step {step:,} (bands: 95% bootstrap)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, "variants_fid_vs_gflops")


def variants_loss_vs_compute(final: pd.DataFrame, out: Path, fits: dict) -> str:
    """Each trial's final training loss against its training compute, one colour and fitted line per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    palette = plt.get_cmap("tab10")
    xs = np.geomspace(final["compute_flops"].min() / 1.5, final["compute_flops"].max() * 1.5, 100)
    for i, (variant, rows) in enumerate(final.groupby("variant")):
        colour = palette(i % 10)
        ax.scatter(rows["compute_flops"], rows["loss"], s=45, color=colour, edgecolor="black", zorder=3)
        if variant in fits:
            fit, samples = fits[variant]
            ax.plot(xs, fit(xs), color=colour, lw=1.3, label=f"{variant}: loss ~ C^{fit.b:.3f}")
            lo, hi = fit.band(xs, samples)
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.12)
        else:
            ax.scatter([], [], color=colour, label=f"{variant} (no fit)")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="final training loss",
           title="final loss vs training compute by variant")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, "variants_loss_vs_compute")


# ---------------------------------------------------------------------------------------------------------------
# The predictive analysis: residuals, the held-out check, L(C), isoFLOP profiles, EMAs, sampling compute
# ---------------------------------------------------------------------------------------------------------------


def _scatter_models(ax, frame: pd.DataFrame, x: str, y: str, annotate: bool = False) -> None:
    """A point per row: its size's colour, its patch's marker, optionally its label."""
    colours = size_colours(frame)
    for _, row in frame.iterrows():
        ax.scatter(row[x], row[y], color=colours[row["size"]], edgecolor="black",
                   marker=MARKERS.get(int(row["patch"]), "o"), zorder=3)  # fmt: skip
        if annotate:
            ax.annotate(row["label"].removeprefix("DiT-"), (row[x], row[y]), fontsize=7, textcoords="offset points",
                        xytext=(4, 3))  # fmt: skip


def _fitted(ax, xs, ys, label: str, band=None, colour="black") -> None:
    """A fitted law and, when given, its 95% bootstrap band."""
    ax.plot(xs, ys, color=colour, lw=1.2, label=label)
    if band is not None:
        ax.fill_between(xs, *band, color=colour, alpha=0.12, label="95% bootstrap band")


def residuals(fits: dict[str, tuple], out: Path) -> str:
    """For each fit {title: (x, measured, fitted)}: log10(measured / fitted) against x (a trend here means the law
    is the wrong shape), three panels to a row."""
    plt = _plt()
    rows = -(-len(fits) // 3)
    cols = min(3, len(fits))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.35, hspace=0.45)
    for ax in axes.flat[len(fits) :]:
        ax.set_visible(False)
    for ax, (title, (x, y, fitted)) in zip(axes.flat, fits.items()):
        x, y, fitted = (np.asarray(v, dtype=float) for v in (x, y, fitted))
        ax.scatter(x, np.log10(y / fitted), s=25, color="tab:blue", edgecolor="black")
        ax.axhline(0, color="black", lw=1)
        ax.set(xscale="log", title=title, ylabel="log10(measured / fitted)")
        ax.title.set_fontsize(9)
        ax.xaxis.set_minor_formatter(_plt().NullFormatter())
        ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "residuals")


def held_out(train_x, train_y, check, out: Path, title: str, name: str, paper_check=None) -> str:
    """The fit without the largest model(s), its prediction with the 95% interval, and the measured value; the
    same on the paper's Table 4 beside it when given."""
    plt = _plt()
    panels = [(train_x, train_y, check, title)]
    if paper_check is not None:
        panels.append(paper_check)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False)
    for ax, (x, y, c, heading) in zip(axes[0], panels):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        fit_on = x < min(c.x)
        ax.scatter(x[fit_on], y[fit_on], color="tab:blue", edgecolor="black", label="fitted on", zorder=3)
        xs = np.geomspace(x.min() / 1.3, max(c.x) * 1.5, 100)
        ax.plot(xs, c.fit(xs), color="tab:blue", lw=1.2, label=f"fit: y = {c.fit.a:.3g} x^{c.fit.b:.3f}")
        for hx, p, (lo, hi), m, e in zip(c.x, c.predicted, c.interval, c.measured, c.errors):
            ax.errorbar(hx, p, yerr=[[p - lo], [hi - p]], fmt="D", color="tab:orange", capsize=4,
                        label=f"predicted {p:.4g} [{lo:.4g}, {hi:.4g}]", zorder=4)  # fmt: skip
            ax.scatter(hx, m, marker="*", s=160, color="tab:red", edgecolor="black", zorder=5,
                       label=f"measured {m:.4g} (error {e:+.0%})")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="forward Gflops", ylabel="FID", title=heading)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, out, name)


def loss_law(final: pd.DataFrame, law, out: Path) -> str:
    """Each trial's final loss against its training compute, with L(C) = E + A C^-alpha, its band and E."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _scatter_models(ax, final, "compute_flops", "loss")
    xs = np.geomspace(final["compute_flops"].min() / 2, final["compute_flops"].max() * 4, 100)
    label = f"L = {law.E:.3g} + {law.A:.3g} C^-{law.alpha:.3f} [{law.alpha_ci[0]:.3f}, {law.alpha_ci[1]:.3f}]"
    _fitted(ax, xs, law(xs), label, law.band(xs))
    ax.axhline(law.E, color="grey", ls="--", lw=1, label=f"irreducible E = {law.E:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel="final training loss",
           title="loss vs training compute: L(C) = E + A C^-alpha")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, "loss_law")


def isoflop(frontier, points: pd.DataFrame, out: Path, value: str = "loss") -> str:
    """Left: the isoFLOP profiles (value against params at each budget, with their parabolas and optima). Right:
    N_opt against compute with its power law."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    palette = plt.get_cmap("viridis")
    budgets = sorted(points["budget"].unique())
    optima = dict(frontier.optima)
    for i, budget in enumerate(budgets):
        rows = points[points["budget"] == budget]
        colour = palette(i / max(1, len(budgets) - 1))
        left.scatter(rows["params"], rows[value], color=colour, s=18)
        if budget in optima and np.unique(rows["params"]).size >= 3:
            logn = np.log10(rows["params"])
            coef = np.polyfit(logn, rows[value], 2)
            grid = np.linspace(logn.min(), logn.max(), 50)
            left.plot(10**grid, np.polyval(coef, grid), color=colour, lw=1, label=f"{budget:.2g} FLOPs")
            left.axvline(optima[budget], color=colour, lw=0.6, ls=":")
    left.set(xscale="log", xlabel="parameters N", ylabel=f"training {value}", title="isoFLOP profiles")
    left.legend(fontsize=6)
    c, n = np.array(frontier.optima).T
    right.scatter(c, n, color="black", zorder=3, label="optimum per budget")
    xs = np.geomspace(c.min() / 2, c.max() * 2, 50)
    right.plot(xs, frontier.n_opt(xs), color="tab:blue",
               label=f"N_opt ~ C^{frontier.a:.3f} [{frontier.a_ci[0]:.3f}, {frontier.a_ci[1]:.3f}]")  # fmt: skip
    right.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="compute-optimal N",
              title=f"frontier (D_opt = C / 6N ~ C^{frontier.b:.3f})")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
    return _save(fig, out, "isoflop")


def emas(table: pd.DataFrame, gflops: pd.Series, out: Path) -> str:
    """FID at the chosen step of each model (by Gflops) for each EMA decay; a ring marks the decay each uses."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    columns = [c for c in table.columns if c.startswith("fid ema ")]
    x = gflops.reindex(table["label"]).to_numpy()
    for column in columns:
        ax.plot(x, table[column], marker="o", label=f"EMA decay {column.removeprefix('fid ema ')}")
    for i, row in table.iterrows():
        best = f"fid ema {row['chosen']:g}"
        if best in table:
            ax.scatter(x[i], row[best], s=140, facecolor="none", edgecolor="black", zorder=4)
    ax.set(xscale="log", yscale="log", xlabel="forward Gflops", ylabel="FID (mean over seeds)",
           title="FID per EMA decay (ring: the decay used)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out, "ema_decays")


def sampling_compute(points_at: pd.DataFrame, frontier: list[dict], out: Path) -> str:
    """FID against sampling compute per image, with the best model at each budget joined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _scatter_models(ax, points_at, "sampling_gflops", "fid", annotate=True)
    if frontier:
        ax.step([f["sampling_gflops"] for f in frontier], [f["fid"] for f in frontier], where="post", color="black",
                lw=1, label="best model at each sampling budget")  # fmt: skip
        ax.legend(fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="sampling compute per image (Gflops x network evaluations)",
           ylabel="FID", title="FID vs sampling compute")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "sampling_compute")


def hyperparameters(sensitivity: pd.DataFrame, axis: str, out: Path) -> str:
    """FID against a swept hyperparameter, one line per model size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for preset, rows in sensitivity.sort_values("gflops").groupby("preset", sort=False):
        rows = rows.sort_values(axis)
        ax.plot(rows[axis], rows["fid"], marker="o", label=preset)
    numeric = pd.api.types.is_numeric_dtype(sensitivity[axis])
    scale = "log" if numeric and (sensitivity[axis] > 0).all() else "linear"
    ax.set(xscale=scale, yscale="log", xlabel=axis.removeprefix("axis."), ylabel="FID (mean over seeds)")
    ax.set_title("sensitivity per model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, "hyperparameters")
