"""A study's summary at one step: every fit, correlation and prediction, as plain values beside the fitted objects.

    summary = summarize(frame, curves, step=None)   # the frames of analysis.loader.load_runs
    summary.json["fid_vs_gflops"]["b"]              # plain values only: summary.json, the printout, the report
    fit, samples = summary.fits["fid_vs_gflops"]    # the fitted objects the figures draw, under the same names

Replicates (seeds) are pooled per model; with several EMAs each model is read at its best one; a study with several
variants is fitted per variant too. Each entry the data cannot support holds {"skipped": the reason}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import Correlation, FitError, correlation
from analysis.laws import isoflop_frontier, isoflop_points
from analysis.study import (
    choose_emas,
    ema_table,
    final_points,
    frame_with_emas,
    hyperparameter_envelope,
    predict,
    replicate_points,
    sampling_frontier,
)
from analysis.variants import VariantFits, fit_variants


@dataclass(frozen=True)
class Summary:
    """What summarize found: `json` holds plain values only; the objects and frames the figures draw are apart."""

    json: dict[str, Any]  # step, presets, replicates, every law's values or reason, ...: what summary.json holds
    points: pd.DataFrame  # one row per (model, step): means, spread and count over seeds
    best: pd.DataFrame  # each model's rows at its chosen EMA: what every fit reads
    fits: dict[str, Any] = field(default_factory=dict)  # per law fitted (json's names): study.predict's objects
    correlation: Correlation | None = None  # FID with log10 Gflops at the step
    ema_table: pd.DataFrame | None = None  # mean FID per model and EMA decay (several EMAs only)
    sensitivity: pd.DataFrame | None = None  # mean FID per model and hyperparameter value (train.* axes only)
    variants: VariantFits | None = None  # each variant's fitted lines (several variants only)

    @property
    def step(self) -> int:
        return self.json["step"]


def choose_step(frame: pd.DataFrame, step: int | None) -> int:
    """The requested step, else the last step scored for every preset (else the last step scored at all)."""
    if frame.empty:
        raise FitError("no scored checkpoints: run `ditscale fid` after (or during) the sweep")
    if step is not None:
        if step not in set(frame["step"]):
            raise FitError(f"no checkpoint was scored at step {step}; scored steps: {sorted(set(frame['step']))}")
        return step
    common = set.intersection(*(set(rows["step"]) for _, rows in frame.groupby("label")))
    return max(common) if common else int(frame["step"].max())


def summarize(frame: pd.DataFrame, curves: pd.DataFrame, step: int | None, holdout: int = 1) -> Summary:
    """Fits, correlations and predictions at `step` (default: choose_step's) of the checkpoints in `frame` and the
    loss `curves`; `holdout` largest models are predicted from the others."""
    frame, curves = with_identity(frame), with_identity(curves)
    chosen = choose_step(frame, step)
    emas = choose_emas(frame, chosen)
    best = frame_with_emas(frame, emas)
    metrics = tuple(m for m in ("fid", "fd_dinov2", "loss", "class_accuracy") if m in best and best[m].notna().any())
    points = replicate_points(best, metrics)
    at, points_at = best[best["step"] == chosen], points[points["step"] == chosen]
    out: dict[str, Any] = {"step": chosen, "presets": int(at["label"].nunique())}
    out["replicates"] = {
        "seeds": sorted(int(s) for s in at["seed"].unique()),
        "note": "intervals resample models, each with all its seeds" if at["seed"].nunique() > 1 else (
            "one seed per model: intervals resample models only, and seed noise is not measured"
        ),
    }  # fmt: skip
    emas_by_model = None
    if frame["ema_decay"].nunique() > 1:
        out["ema"] = {
            "decays": sorted(float(d) for d in frame["ema_decay"].unique()),
            "chosen": emas,
            "note": "each model is read at the EMA decay with the lowest mean FID at this step",
        }
        emas_by_model = ema_table(frame, chosen, emas)
    laws, fits = predict(best, curves, chosen, holdout)
    out.update(laws)
    corr = None
    if "fid_vs_gflops" in fits:
        try:
            corr = correlation(points_at["gflops"], points_at["fid"], what=f"FID vs Gflops at step {chosen}")
            out["fid_vs_gflops"].update(
                {"pearson_r_log_gflops": corr.pearson, "pearson_p": corr.pearson_p, "spearman": corr.spearman}
            )
        except FitError as exc:
            out["fid_vs_gflops"]["correlation"] = f"none ({exc})"
    progress = first_to_last(points)
    if progress:
        out["fid_first_to_last"] = progress
    if "class_accuracy" in points_at and points_at["class_accuracy"].notna().any():
        out["class_accuracy"] = {row.label: float(row.class_accuracy) for row in points_at.itertuples()}
    final = final_points(curves)
    if len(final):
        means = final.groupby("label").agg(gflops=("gflops", "first"), loss=("loss", "mean"))
        try:
            loss_corr = correlation(means["gflops"], means["loss"], what="final loss vs Gflops")
            out["loss_vs_gflops"] = {"spearman": loss_corr.spearman, "pearson_r_log_gflops": loss_corr.pearson}
        except FitError as exc:
            out["loss_vs_gflops"] = {"skipped": str(exc)}
    out["sampling"] = sampling_frontier(points_at)
    envelope, sensitivity = hyperparameter_envelope(points_at, best, chosen)
    if envelope:
        out["hyperparameters"] = envelope
    variants = None
    if frame["variant"].nunique() > 1:
        variants = fit_variants(at, curves, chosen, best)
        out["by_variant"] = variants.json
        for variant, entry in variants.json["variants"].items():
            mine = curves[curves["variant"] == variant] if len(curves) else curves
            entry["isoflop"] = isoflop_from_curves(mine) if len(mine) else {"skipped": "no loss curves logged"}
    return Summary(out, points, best, fits, corr, emas_by_model, sensitivity, variants)


def first_to_last(points: pd.DataFrame) -> dict[str, Any]:
    """Per model scored at 2+ steps, its FID at the first and the last; how many improved, and which did not."""
    progress = {}
    for label, rows in points.sort_values("step").groupby("label"):
        if rows["step"].nunique() >= 2:
            first, last = rows.iloc[0], rows.iloc[-1]
            progress[label] = {
                "first_step": int(first["step"]),
                "first_fid": float(first["fid"]),
                "last_step": int(last["step"]),
                "last_fid": float(last["fid"]),
            }
    if not progress:
        return {}
    worse = sorted(p for p, v in progress.items() if not v["last_fid"] < v["first_fid"])
    return {"presets": progress, "improved": len(progress) - len(worse), "not": worse}


def with_identity(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame with `variant`, `label`, `seed` and `ema_decay` columns (frames built by hand may hold only
    presets)."""
    if len(frame.columns) == 0:
        return frame
    defaults = {"variant": "default", "seed": 0, "ema_decay": np.nan, "ema_name": ""}
    frame = frame.assign(**{k: v for k, v in defaults.items() if k not in frame})
    if "label" not in frame:
        frame = frame.assign(label=frame["preset"])
    return frame


def isoflop_from_curves(curves: pd.DataFrame, num_budgets: int = 8) -> dict[str, Any]:
    """Compute-optimal model size per budget (Chinchilla's approach 2, Liang et al.'s isoFLOP profiles): each
    model's training loss read off its curve at shared compute budgets, a parabola in log N per budget reached by
    3+ sizes, and N_opt ~ C^a over the budgets whose minimum lies inside the sizes trained."""
    try:
        f = isoflop_frontier(isoflop_points(with_identity(curves), num_budgets))
    except FitError as exc:
        return {"skipped": str(exc)}
    return {
        "a": f.a,
        "a_ci": f.a_ci,
        "b": f.b,
        "b_ci": f.b_ci,
        "optima": [{"compute_flops": c, "optimal_params": n} for c, n in f.optima],
    }
