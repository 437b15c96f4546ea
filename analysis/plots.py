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


def fid_vs_gflops(at_step: pd.DataFrame, out: Path, step: int, fit=None, samples=None, corr=None, paper=None) -> str:
    """The paper's Figure 8: FID against Gflops at one training step, with the fitted power law and its band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = size_colours(at_step)
    for _, row in at_step.iterrows():
        ax.scatter(
            row["gflops"],
            row["fid"],
            s=60,
            color=colours[row["size"]],
            marker=MARKERS.get(row["patch"], "o"),
            edgecolor="black",
            zorder=3,
        )
        ax.annotate(
            row["label"].removeprefix("DiT-"),
            (row["gflops"], row["fid"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    if fit is not None:
        xs = np.geomspace(at_step["gflops"].min() / 1.5, at_step["gflops"].max() * 1.5, 100)
        ax.plot(
            xs,
            fit(xs),
            color="black",
            lw=1.2,
            label=f"FID = {fit.a:.3g} * Gflops^{fit.b:.3f} [{fit.b_ci[0]:.3f}, {fit.b_ci[1]:.3f}]",
        )
        if samples is not None and len(samples):
            lo, hi = fit.band(xs, samples)
            ax.fill_between(xs, lo, hi, color="black", alpha=0.12, label="95% bootstrap band")
    if paper is not None:
        ax.scatter(paper["gflops"], paper["fid"], marker="x", color="grey", label="paper, 400K steps", zorder=2)
    title = f"FID vs Gflops at step {step:,}"
    if corr is not None:
        title += f"  (r = {corr.pearson:.2f} with log Gflops)"
    ax.set(xscale="log", yscale="log", xlabel="forward Gflops (paper convention)", ylabel="FID", title=title)
    ax.grid(alpha=0.3, which="both")
    if fit is not None or paper is not None:
        ax.legend(fontsize=7)
    return _save(fig, out, "fid_vs_gflops")


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
