"""Designs compared by how they scale: a fit per variant, their table, and where one overtakes another.

For each variant of a study (its `grid.variants` or axis values): FID = a * Gflops^b over its trials at the chosen
step, and final training loss = a * C^b over training compute C, each with its 95% bootstrap interval; the FID at
its largest Gflops, measured and fitted. Two variants' FID lines cross where a1 x^b1 = a2 x^b2, at
x* = (a2 / a1)^(1 / (b1 - b2)): below x* one is better, above it the other. The crossing is reported with whether
it lies inside the measured range (an observation) or outside it (an extrapolation of the fits).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.fits import FitError, PowerLaw, compute_frontier, fit_power_law


@dataclass(frozen=True)
class VariantFits:
    """Each variant's fits: `json` = {"variants": {name: fits or their reasons}, "crossovers": [...]} in plain values,
    and the fitted lines the figures draw, per variant: (PowerLaw, bootstrap samples)."""

    json: dict[str, Any]
    fid: dict[str, tuple[PowerLaw, np.ndarray]] = field(default_factory=dict)  # FID vs Gflops
    loss: dict[str, tuple[PowerLaw, np.ndarray]] = field(default_factory=dict)  # final loss vs training compute


def fit_variants(
    at_step: pd.DataFrame, curves: pd.DataFrame, step: int, checkpoints: pd.DataFrame | None = None
) -> VariantFits:
    """A fit per variant of the rows at `step` and of its loss `curves`, and where the variants' FID lines cross.

    Rows of one model with several seeds are replicates (pooled by the fits); `checkpoints` (every scored step)
    gives each variant's FID against training compute over the lower envelope of its checkpoints."""
    out = VariantFits({"variants": {}, "crossovers": []})
    by_run = ["label", "seed"] if "seed" in curves else ["label"]
    final = curves.sort_values("step").groupby(by_run).tail(1) if len(curves) else curves
    for variant, rows in at_step.groupby("variant"):
        entry: dict[str, Any] = {"trials": int(len(rows))}
        means = rows.groupby("label").agg(gflops=("gflops", "first"), fid=("fid", "mean"))
        label = means["gflops"].idxmax()
        largest = {"label": label, "gflops": float(means.loc[label, "gflops"]), "fid": float(means.loc[label, "fid"])}
        entry["largest"] = largest
        try:
            fit, samples = fit_power_law(rows["gflops"], rows["fid"], what=f"{variant}: FID vs Gflops at step {step}")
            entry["fid_vs_gflops"] = {"a": fit.a, "b": fit.b, "a_ci": fit.a_ci, "b_ci": fit.b_ci, "r2": fit.r2}
            if fit.seed_share is not None:
                entry["fid_vs_gflops"]["seed_share"] = fit.seed_share
            entry["largest"]["fitted_fid"] = float(fit(largest["gflops"]))
            out.fid[variant] = (fit, samples)
        except FitError as exc:
            entry["fid_vs_gflops"] = {"skipped": str(exc)}
        if checkpoints is not None:
            mean = (
                checkpoints[checkpoints["variant"] == variant]
                .groupby(["label", "step"], as_index=False)
                .agg(compute_flops=("compute_flops", "first"), fid=("fid", "mean"))
            )
            envelope = mean.iloc[compute_frontier(mean["compute_flops"], mean["fid"])]
            try:
                cfit, _ = fit_power_law(envelope["compute_flops"], envelope["fid"], what=f"{variant}: FID vs compute")
                entry["fid_vs_compute"] = {"a": cfit.a, "b": cfit.b, "b_ci": cfit.b_ci, "r2": cfit.r2}
            except FitError as exc:
                entry["fid_vs_compute"] = {"skipped": str(exc)}
        mine = final[final["variant"] == variant] if len(final) else final
        try:
            if mine.empty:
                raise FitError(f"{variant}: no loss curves logged")
            lfit, lsamples = fit_power_law(mine["compute_flops"], mine["loss"], what=f"{variant}: loss vs compute")
            entry["loss_vs_compute"] = {"a": lfit.a, "b": lfit.b, "b_ci": lfit.b_ci, "r2": lfit.r2}
            out.loss[variant] = (lfit, lsamples)
        except FitError as exc:
            entry["loss_vs_compute"] = {"skipped": str(exc)}
        out.json["variants"][variant] = entry
    lo, hi = float(at_step["gflops"].min()), float(at_step["gflops"].max())
    recipes = at_step[["global_batch_size", "step"]].drop_duplicates() if "global_batch_size" in at_step else []
    for (v1, (f1, _)), (v2, (f2, _)) in itertools.combinations(out.fid.items(), 2):
        c = crossover(v1, f1, v2, f2, lo, hi)
        if c["gflops"] is not None and len(recipes) == 1:  # one batch and step for all: Gflops -> training FLOPs
            batch, steps = recipes.iloc[0]
            c["training_flops"] = c["gflops"] * 1e9 * 6 * float(batch) * float(steps)
            c["note"] += f" (a training compute of {c['training_flops']:.3g} FLOPs at {int(steps):,} steps)"
        out.json["crossovers"].append(c)
    return out


def crossover(v1: str, f1: PowerLaw, v2: str, f2: PowerLaw, lo: float, hi: float) -> dict[str, Any]:
    """Where the FID lines of v1 and v2 cross, and which is better on either side."""
    better_at = lambda x: v1 if f1(x) < f2(x) else v2  # noqa: E731
    if np.isclose(f1.b, f2.b):
        return {"between": [v1, v2], "gflops": None, "note": f"parallel fits: {better_at(hi)} is better everywhere"}
    x = float((f2.a / f1.a) ** (1.0 / (f1.b - f2.b)))
    below, above = better_at(x / 10), better_at(x * 10)
    where = "inside the measured range" if lo <= x <= hi else "outside the measured range (an extrapolation)"
    return {
        "between": [v1, v2],
        "gflops": x,
        "inside": bool(lo <= x <= hi),
        "note": f"{above} overtakes {below} at {x:.3g} Gflops, {where} [{lo:.3g}, {hi:.3g}]",
    }


def variants_table(summary: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for variant, entry in summary["variants"].items():
        f, loss, largest = entry["fid_vs_gflops"], entry["loss_vs_compute"], entry["largest"]
        fitted = "skipped" not in f
        rows.append(
            {
                "variant": variant,
                "trials": entry["trials"],
                "fid_exponent_b": f["b"] if fitted else np.nan,
                "b_ci_lo": f["b_ci"][0] if fitted else np.nan,
                "b_ci_hi": f["b_ci"][1] if fitted else np.nan,
                "prefactor_a": f["a"] if fitted else np.nan,
                "largest": largest["label"],
                "fid_at_largest": largest["fid"],
                "fitted_fid_at_largest": largest.get("fitted_fid", np.nan),
                "fid_compute_exponent": entry.get("fid_vs_compute", {}).get("b", np.nan),
                "loss_exponent": loss.get("b", np.nan),
            }
        )
    return pd.DataFrame(rows)


def describe_variants(summary: dict[str, Any]) -> list[str]:
    lines = []
    for variant, entry in summary["variants"].items():
        f, largest = entry["fid_vs_gflops"], entry["largest"]
        fit = f"no fit ({f['skipped']})" if "skipped" in f else (
            f"FID = {f['a']:.4g} * Gflops^{f['b']:.3f} [{f['b_ci'][0]:.3f}, {f['b_ci'][1]:.3f}]"
        )  # fmt: skip
        loss = entry["loss_vs_compute"]
        loss_text = (
            "" if "skipped" in loss else f"; loss ~ C^{loss['b']:.3f} [{loss['b_ci'][0]:.3f}, {loss['b_ci'][1]:.3f}]"
        )
        trials = f"{entry['trials']} trial{'' if entry['trials'] == 1 else 's'}"
        lines.append(
            f"  variant {variant} ({trials}): {fit}{loss_text}; FID {largest['fid']:.4g} at "
            f"{largest['label']} ({largest['gflops']:.3g} Gflops)"
        )
    for c in summary["crossovers"]:
        lines.append(f"  {' vs '.join(c['between'])}: {c['note']}")
    return lines
