"""What a study predicts: replicates pooled, the best EMA per model, and every law fitted with its interval.

    emas = choose_emas(frame, step)           # per model, the EMA decay with the lowest mean FID at `step`
    best = frame_with_emas(frame, emas)       # one EMA per model: the rows every fit reads
    points = replicate_points(best)           # mean, spread and count over seeds per (model, step)
    laws, fits = predict(best, curves, step)  # {name: result or {"skipped": reason}}, {name: fitted object}

Each entry of `predict`'s first part is plain values (for summary.json and the report); its second part holds the
fitted objects the figures draw, under the same names. Data that cannot support a fit gives {"skipped": the
reason}, never a line.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import FitError, PowerLaw, compute_frontier, fit_power_law
from analysis.laws import fit_parametric, fit_saturating, held_out, isoflop_frontier, isoflop_points

# ---------------------------------------------------------------------------------------------------------------
# Several EMAs: the best per model
# ---------------------------------------------------------------------------------------------------------------


def choose_emas(frame: pd.DataFrame, step: int, metric: str = "fid") -> dict[str, float]:
    """{label: EMA decay} with the lowest mean `metric` over seeds at `step` (EDM2: the best EMA length depends on
    the model's size); a model scored with one EMA keeps it."""
    at = frame[(frame["step"] == step) & np.isfinite(frame[metric])]
    means = at.groupby(["label", "ema_decay"])[metric].mean().reset_index()
    chosen = {label: float(rows.loc[rows[metric].idxmin(), "ema_decay"]) for label, rows in means.groupby("label")}
    for label, rows in frame.groupby("label"):  # models without a score at `step` keep their first EMA
        chosen.setdefault(label, float(rows["ema_decay"].iloc[0]))
    return chosen


def frame_with_emas(frame: pd.DataFrame, emas: dict[str, float]) -> pd.DataFrame:
    """The rows of each model's chosen EMA."""
    if "ema_decay" not in frame or frame["ema_decay"].nunique(dropna=False) <= 1:
        return frame
    keep = frame["ema_decay"].to_numpy() == frame["label"].map(emas).to_numpy()
    return frame[keep].reset_index(drop=True)


def ema_table(frame: pd.DataFrame, step: int, emas: dict[str, float], metric: str = "fid") -> pd.DataFrame:
    """Mean `metric` at `step` per model (rows) and EMA decay (columns), with the chosen decay."""
    at = frame[frame["step"] == step]
    table = at.pivot_table(index="label", columns="ema_decay", values=metric, aggfunc="mean")
    table.columns = [f"{metric} ema {d:g}" for d in table.columns]
    table["chosen"] = [emas.get(label, np.nan) for label in table.index]
    order = at.groupby("label")["gflops"].first().sort_values().index
    return table.loc[[label for label in order if label in table.index]].reset_index()


# ---------------------------------------------------------------------------------------------------------------
# Replicates
# ---------------------------------------------------------------------------------------------------------------


def replicate_points(frame: pd.DataFrame, metrics: tuple[str, ...] = ("fid", "loss")) -> pd.DataFrame:
    """One row per (model, step): the model's facts, and for each metric its mean, std, min, max over seeds and the
    seed count (`seeds`)."""
    keys = [k for k in ("label", "variant", "preset", "size", "patch", "params", "gflops", "step") if k in frame]
    facts = [k for k in ("compute_flops", "sampling_gflops", "ema_decay") if k in frame]
    present = [m for m in metrics if m in frame]
    grouped = frame.groupby(keys, sort=False)
    out = grouped[facts].first() if facts else grouped.size().to_frame("_")[[]]
    for m in present:
        stats = grouped[m].agg(["mean", "std", "min", "max"])
        stats.columns = [m, f"{m}_std", f"{m}_min", f"{m}_max"]
        out = out.join(stats)
    out["seeds"] = grouped["seed"].nunique() if "seed" in frame else grouped.size()
    return out.reset_index().sort_values(["gflops", "step"], ignore_index=True)


def _power_law_entry(fit: PowerLaw) -> dict[str, Any]:
    entry = {"a": fit.a, "b": fit.b, "a_ci": fit.a_ci, "b_ci": fit.b_ci, "r2": fit.r2, "n": fit.n}
    if fit.b_seed_ci is not None:
        entry["b_seed_ci"], entry["seed_share"] = fit.b_seed_ci, fit.seed_share
    return entry


def _try(name: str, results: dict[str, Any], objects: dict[str, Any], make) -> None:
    """results[name] = make()'s entry, or {"skipped": reason} when the data cannot support it."""
    try:
        entry, obj = make()
        results[name] = entry
        objects[name] = obj
    except FitError as exc:
        results[name] = {"skipped": str(exc)}


# ---------------------------------------------------------------------------------------------------------------
# The laws
# ---------------------------------------------------------------------------------------------------------------


def final_points(curves: pd.DataFrame) -> pd.DataFrame:
    """Each trial's last logged loss at its training compute (one row per model and seed)."""
    if curves.empty:
        return curves
    return curves.sort_values("step").groupby(["label", "seed"]).tail(1).reset_index(drop=True)


def predict(
    best: pd.DataFrame, curves: pd.DataFrame, step: int, holdout: int = 1
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every law of the study on its best-EMA rows `best` and its loss `curves`, at `step` where one is chosen:
    (plain values or the reason per law, the fitted object(s) of each law that was fitted)."""
    results: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    at = best[best["step"] == step]
    for metric in ("fid", "fd_dinov2"):
        if metric not in at or not at[metric].notna().any():
            continue
        name = "fid" if metric == "fid" else "fd_dinov2"

        def gflops_fit(metric=metric):
            fit, samples = fit_power_law(at["gflops"], at[metric], what=f"{metric} vs Gflops at step {step}")
            return _power_law_entry(fit), (fit, samples)

        _try(f"{name}_vs_gflops", results, objects, gflops_fit)

        def held(metric=metric):
            check = held_out(at["gflops"], at[metric], holdout, what=f"{metric}: held-out largest model")
            labels = at.groupby("gflops")["label"].first()
            entry = {
                "fit_on": int(np.unique(at["gflops"]).size - holdout),
                "fit": _power_law_entry(check.fit),
                "predictions": [
                    {
                        "label": labels[x],
                        "gflops": x,
                        "predicted": p,
                        "interval": i,
                        "measured": m,
                        "error": e,
                        "inside": bool(inside),
                    }
                    for x, p, i, m, e, inside in zip(
                        check.x, check.predicted, check.interval, check.measured, check.errors, check.inside
                    )
                ],  # fmt: skip
            }
            return entry, check

        _try(f"{name}_held_out", results, objects, held)

    def compute_fit():  # FID against training compute: the lower envelope over every scored checkpoint (means)
        points = replicate_points(best, ("fid",))
        frontier = points.iloc[compute_frontier(points["compute_flops"], points["fid"])]
        fit, samples = fit_power_law(frontier["compute_flops"], frontier["fid"], what="FID vs training compute")
        return {**_power_law_entry(fit), "frontier": frontier["label"].tolist()}, (fit, samples, frontier)

    _try("fid_vs_compute", results, objects, compute_fit)

    final = final_points(curves)

    def loss_law():
        law = fit_saturating(final["compute_flops"], final["loss"], what="final loss vs training compute")
        entry = {"E": law.E, "A": law.A, "alpha": law.alpha, "E_ci": law.E_ci, "A_ci": law.A_ci,
                 "alpha_ci": law.alpha_ci, "n": law.n}  # fmt: skip
        if law.alpha_seed_ci is not None:
            entry["alpha_seed_ci"], entry["seed_share"] = law.alpha_seed_ci, law.seed_share
        return entry, law

    if not final.empty:
        _try("loss_vs_compute", results, objects, loss_law)
        points = isoflop_points(curves)

        def frontier():
            f = isoflop_frontier(points)
            entry = {"a": f.a, "a_ci": f.a_ci, "b": f.b, "b_ci": f.b_ci,
                     "optima": [{"compute_flops": c, "optimal_params": n} for c, n in f.optima]}  # fmt: skip
            return entry, (f, points)

        _try("isoflop", results, objects, frontier)

        def fid_frontier():  # the same on the FID of the scored checkpoints (fewer points per curve)
            fid_points = isoflop_points(best[np.isfinite(best["fid"])], value="fid")
            f = isoflop_frontier(fid_points, value="fid")
            entry = {"a": f.a, "a_ci": f.a_ci, "b": f.b, "b_ci": f.b_ci,
                     "optima": [{"compute_flops": c, "optimal_params": n} for c, n in f.optima]}  # fmt: skip
            return entry, (f, fid_points)

        _try("isoflop_fid", results, objects, fid_frontier)

        def surface():
            rows = curves[np.isfinite(curves["loss"]) & (curves["step"] > 0)]
            tokens = rows["compute_flops"] / (6 * rows["params"])  # the C = 6ND convention
            p = fit_parametric(rows["params"], tokens, rows["loss"], sizes=rows["size"] if "size" in rows else None)
            entry = {"E": p.E, "A": p.A, "alpha": p.alpha, "B": p.B, "beta": p.beta, "a": p.a, "ci": p.ci, "n": p.n}
            return entry, p

        _try("parametric", results, objects, surface)
    return results, objects


# ---------------------------------------------------------------------------------------------------------------
# Sampling compute and hyperparameters
# ---------------------------------------------------------------------------------------------------------------


def sampling_frontier(points_at: pd.DataFrame) -> dict[str, Any]:
    """FID against sampling compute per image (Gflops x network evaluations): which model is best at each
    sampling budget (Mei et al.: at a fixed sampling budget a smaller model can win)."""
    if "sampling_gflops" not in points_at:
        return {"skipped": "no sampling compute recorded"}
    rows = points_at[np.isfinite(points_at["sampling_gflops"])]
    if rows.empty:
        return {"skipped": "no sampling compute recorded (runs scored before fid.evaluations_per_image was logged)"}
    front = rows.iloc[compute_frontier(rows["sampling_gflops"], rows["fid"])]
    return {
        "frontier": [
            {"label": r.label, "sampling_gflops": float(r.sampling_gflops), "fid": float(r.fid)}
            for r in front.itertuples()
        ],
        "best_at_budget": "; ".join(
            f"up to {b.sampling_gflops:.3g} Gflops/image: {b.label} (FID {b.fid:.4g})" for b in front.itertuples()
        ),
    }


HYPERPARAMETER_PREFIX = "axis.train."


def hyperparameter_envelope(
    points_at: pd.DataFrame, best_rows: pd.DataFrame, step: int
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """When the grid sweeps training hyperparameters (axes train.*): the best value per model size (mean FID over
    seeds) and a fit on that envelope, and the sensitivity: each value's mean FID per size. ({}, None) without
    such axes."""
    axes = [c for c in best_rows.columns if c.startswith(HYPERPARAMETER_PREFIX)]
    if not axes:
        return {}, None
    at = best_rows[best_rows["step"] == step]
    means = at.groupby(["preset", *axes], dropna=False).agg(fid=("fid", "mean"), gflops=("gflops", "first"))
    means = means.reset_index()
    chosen = means.loc[means.groupby("preset")["fid"].idxmin()]
    envelope_rows = at.merge(chosen[["preset", *axes]], on=["preset", *axes])
    out: dict[str, Any] = {
        "axes": [a.removeprefix("axis.") for a in axes],
        "best": {
            r["preset"]: {a.removeprefix("axis."): r[a] for a in axes} | {"fid": float(r["fid"])}
            for _, r in chosen.iterrows()
        },  # fmt: skip
    }
    try:
        fit, _ = fit_power_law(envelope_rows["gflops"], envelope_rows["fid"], what="envelope FID vs Gflops")
        out["envelope_fit"] = _power_law_entry(fit)
    except FitError as exc:
        out["envelope_fit"] = {"skipped": str(exc)}
    return out, means
