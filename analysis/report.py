"""analyze: MLflow -> tidy frame -> fits, figures and tables in a folder.

    ditscale analyze quickstart [--step 600]

Prints the fitted exponent of FID = a * Gflops^b at the chosen step with its 95% bootstrap interval and the
Pearson correlation of FID with log Gflops (`r = -0.93` in the paper), writes figures (PNG and SVG), the Table-4
layout (CSV and Markdown), the tidy frame and the fitted coefficients (JSON). Reads MLflow alone, so it can be run
again at any time; it writes nothing to MLflow itself: the pipeline's analyze stage logs the folder and the returned
`metrics` to the sweep's parent run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import plots
from analysis.config import AnalysisConfig
from analysis.fits import FitError, compute_frontier, correlation, fit_power_law, isoflop_optimum
from analysis.loader import load_runs
from analysis.variants import describe_variants, fit_variants, variants_table

# Table 4 of the paper (ImageNet 256, 400K steps, no guidance, FID-50K).
PAPER_TABLE4 = pd.DataFrame(
    [("DiT-S/8", 0.36, 153.60), ("DiT-S/4", 1.41, 100.41), ("DiT-S/2", 6.06, 68.40),
     ("DiT-B/8", 1.42, 122.74), ("DiT-B/4", 5.56, 68.38), ("DiT-B/2", 23.01, 43.47),
     ("DiT-L/8", 5.01, 118.87), ("DiT-L/4", 19.70, 45.64), ("DiT-L/2", 80.71, 23.33),
     ("DiT-XL/8", 7.39, 106.41), ("DiT-XL/4", 29.05, 43.01), ("DiT-XL/2", 118.64, 19.47)],
    columns=["preset", "gflops", "fid"],
)  # fmt: skip


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


def table4(at_step: pd.DataFrame, with_paper: bool) -> pd.DataFrame:
    columns = ["label", "preset", "variant", "gflops", "params", "fid", "loss"]
    if "class_accuracy" in at_step and at_step["class_accuracy"].notna().any():
        columns.append("class_accuracy")
    table = at_step[columns].copy()
    table["params_M"] = table.pop("params") / 1e6
    if table["variant"].nunique() <= 1:
        table = table.drop(columns=["label", "variant"])
    if with_paper:
        table = table.merge(
            PAPER_TABLE4.rename(columns={"gflops": "paper_gflops", "fid": "paper_fid_400k"}), on="preset", how="left"
        )
    return table.sort_values("gflops", ignore_index=True)


def summarize(frame: pd.DataFrame, curves: pd.DataFrame, step: int | None) -> dict[str, Any]:
    """Fits and correlations (each one's reason instead where the data cannot support it); per variant too, where
    the study has several."""
    frame = with_identity(frame)
    curves = with_identity(curves)
    chosen = choose_step(frame, step)
    at = frame[frame["step"] == chosen]
    summary: dict[str, Any] = {"step": chosen, "presets": int(at["label"].nunique())}
    try:
        fit, samples = fit_power_law(at["gflops"], at["fid"], what=f"FID vs Gflops at step {chosen}")
        corr = correlation(at["gflops"], at["fid"], what=f"FID vs Gflops at step {chosen}")
        summary["fid_vs_gflops"] = {
            "a": fit.a,
            "b": fit.b,
            "a_ci": fit.a_ci,
            "b_ci": fit.b_ci,
            "r2": fit.r2,
            "n": fit.n,
            "pearson_r_log_gflops": corr.pearson,
            "pearson_p": corr.pearson_p,
            "spearman": corr.spearman,
        }
        summary["_fit"], summary["_samples"], summary["_corr"] = fit, samples, corr
    except FitError as exc:
        summary["fid_vs_gflops"] = {"skipped": str(exc)}
    progress = {}
    for preset, rows in frame.sort_values("step").groupby("label"):
        if rows["step"].nunique() >= 2:
            first, last = rows.iloc[0], rows.iloc[-1]
            progress[preset] = {
                "first_step": int(first["step"]),
                "first_fid": float(first["fid"]),
                "last_step": int(last["step"]),
                "last_fid": float(last["fid"]),
            }
    if progress:
        worse = sorted(p for p, v in progress.items() if not v["last_fid"] < v["first_fid"])
        summary["fid_first_to_last"] = {"presets": progress, "improved": len(progress) - len(worse), "not": worse}
    if "class_accuracy" in at and at["class_accuracy"].notna().any():
        summary["class_accuracy"] = {row.label: float(row.class_accuracy) for row in at.itertuples()}
    frontier = frame.iloc[compute_frontier(frame["compute_flops"], frame["fid"])] if len(frame) else frame
    try:
        cfit, _ = fit_power_law(frontier["compute_flops"], frontier["fid"], what="FID vs training compute frontier")
        summary["fid_vs_compute"] = {"a": cfit.a, "b": cfit.b, "b_ci": cfit.b_ci, "n": cfit.n}
        summary["_cfit"] = cfit
    except FitError as exc:
        summary["fid_vs_compute"] = {"skipped": str(exc)}
    if len(curves):
        final = curves.sort_values("step").groupby("label").tail(1)
        try:
            corr = correlation(final["gflops"], final["loss"], what="final loss vs Gflops")
            summary["loss_vs_gflops"] = {"spearman": corr.spearman, "pearson_r_log_gflops": corr.pearson}
        except FitError as exc:
            summary["loss_vs_gflops"] = {"skipped": str(exc)}
        if curves["variant"].nunique() <= 1:
            summary["isoflop"] = isoflop_from_curves(curves)
    if frame["variant"].nunique() > 1:
        summary["by_variant"] = fit_variants(at, curves, chosen)
        for variant, entry in summary["by_variant"]["variants"].items():
            entry["isoflop"] = isoflop_from_curves(curves[curves["variant"] == variant])
    return summary


def with_identity(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame with `variant` and `label` columns (frames built by hand may hold only presets)."""
    if len(frame.columns) == 0:
        return frame
    if "variant" not in frame:
        frame = frame.assign(variant="default")
    if "label" not in frame:
        frame = frame.assign(label=frame["preset"])
    return frame


def isoflop_from_curves(curves: pd.DataFrame, num_budgets: int = 8) -> dict[str, Any]:
    """Compute-optimal model size per budget (Liang et al.'s isoFLOP profiles): each model's training loss is read
    off its curve at shared compute budgets; budgets reached by at least 3 model sizes get a parabola fit."""
    curves = with_identity(curves)
    budgets = np.geomspace(curves["compute_flops"].min(), curves["compute_flops"].max(), num_budgets)
    points = []
    for _, rows in curves.groupby("label"):
        rows = rows.sort_values("compute_flops")
        logc = np.log10(rows["compute_flops"].to_numpy())
        for budget in budgets:
            if logc[0] <= np.log10(budget) <= logc[-1]:
                loss = np.interp(np.log10(budget), logc, rows["loss"].to_numpy())
                points.append((rows["params"].iloc[0], budget, loss))
    optima = isoflop_optimum(*zip(*points)) if points else []
    if not optima:
        return {"skipped": "no compute budget is reached by 3 or more model sizes with a minimum inside their range"}
    return {"optima": [{"compute_flops": c, "optimal_params": n} for c, n in optima]}


PUBLISHED = {"dit-table4": PAPER_TABLE4}  # AnalysisConfig.reference -> the published points


def analyze(
    tracking_uri: str,
    experiment_name: str,
    out_dir: str,
    step: int | None = None,
    config: AnalysisConfig = AnalysisConfig(),
    sweep: str | None = None,
) -> dict[str, Any]:
    """Write the analysis of an experiment's runs (those of `sweep`, or all) to `out_dir`; returns the summary, whose
    `metrics` are the headline fits to log beside it."""
    frame, curves, notes = load_runs(tracking_uri, experiment_name, sweep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for note in notes:
        print(f"analyze: {note}")
    frame.to_csv(out / "checkpoints.csv", index=False)
    curves.to_csv(out / "curves.csv", index=False)
    summary = summarize(frame, curves, step)
    at = frame[frame["step"] == summary["step"]]
    figures = [
        plots.fid_vs_steps(frame, out),
        plots.fid_vs_gflops(
            at,
            out,
            summary["step"],
            summary.get("_fit"),
            summary.get("_samples"),
            summary.get("_corr"),
            PUBLISHED.get(config.reference),
        ),
        plots.fid_vs_compute(frame, out, summary.get("_cfit")),
    ]
    if len(curves):
        figures.append(plots.loss_curves(curves, out))
    by_variant = summary.get("by_variant")
    if by_variant:
        figures.append(plots.variants_fid_vs_gflops(at, out, summary["step"], by_variant["_fits"]))
        if len(curves):
            final = curves.sort_values("step").groupby("label").tail(1)
            figures.append(plots.variants_loss_vs_compute(final, out, by_variant["_loss_fits"]))
        table = variants_table(by_variant)
        table.to_csv(out / "variants.csv", index=False)
        (out / "variants.md").write_text(_markdown(table))
    figures += _sample_grids(tracking_uri, at, out, summary["step"], notes)
    table = table4(at, config.reference == "dit-table4")
    table.to_csv(out / "table4.csv", index=False)
    (out / "table4.md").write_text(
        table.to_markdown(index=False, floatfmt=".4g") if _has_tabulate() else _markdown(table)
    )
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    if by_variant:
        public["by_variant"] = {k: v for k, v in by_variant.items() if not k.startswith("_")}
    public["notes"] = notes
    (out / "summary.json").write_text(json.dumps(public, indent=2, default=float))
    print(describe(public))
    public["figures"] = figures
    public["metrics"] = headline_metrics(public)
    return public


def _sample_grids(tracking_uri: str, at_step: pd.DataFrame, out: Path, step: int, notes: list[str]) -> list[str]:
    """Copy each preset's grid of samples at `step` (logged by the fid stage) to <out>/samples/<preset>.png."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per grid is noise here
    client, found = MlflowClient(tracking_uri=tracking_uri), []
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for row in at_step.sort_values("gflops").itertuples():
        name = f"samples_step{step:07d}.png"
        try:
            local = client.download_artifacts(row.run_id, f"samples/{name}", str(out / "samples"))
        except Exception as exc:  # an artifact store that is gone must not stop the analysis
            notes.append(f"{row.run_name} ({row.label}): no sample grid at step {step} ({type(exc).__name__})")
            print(f"analyze: {notes[-1]}")
            continue
        target = out / "samples" / f"{row.label.replace('/', '_').replace(' ', '_')}.png"
        Path(local).replace(target)
        found.append(str(target))
    return found


def describe(summary: dict[str, Any]) -> str:
    lines = [f"analysis at step {summary['step']:,} over {summary['presets']} presets"]
    f = summary["fid_vs_gflops"]
    if "skipped" in f:
        lines.append(f"  FID vs Gflops: no fit ({f['skipped']})")
    else:
        lines.append(
            f"  FID = {f['a']:.4g} * Gflops^{f['b']:.3f}  (95% CI of the exponent [{f['b_ci'][0]:.3f}, "
            f"{f['b_ci'][1]:.3f}], R^2 {f['r2']:.2f})"
        )
        lines.append(
            f"  r = {f['pearson_r_log_gflops']:.2f} (Pearson, FID vs log Gflops; Spearman "
            f"{f['spearman']:.2f}); the paper: r = -0.93"
        )
    progress = summary.get("fid_first_to_last")
    if progress:
        worse = f" (not: {', '.join(progress['not'])})" if progress["not"] else ""
        lines.append(
            f"  FID improved from the first to the last scored checkpoint in {progress['improved']} of "
            f"{len(progress['presets'])} trials{worse}"
        )
    accuracy = summary.get("class_accuracy")
    if accuracy:
        lines.append(
            "  class accuracy of the samples (classifier trained on the real images): "
            + ", ".join(f"{preset} {acc:.0%}" for preset, acc in accuracy.items())
        )
    c = summary["fid_vs_compute"]
    frontier = f"no fit ({c['skipped']})" if "skipped" in c else f"FID ~ C^{c['b']:.3f} over {c['n']} checkpoints"
    lines.append(f"  FID vs training compute frontier: {frontier}")
    loss = summary.get("loss_vs_gflops", {})
    if "spearman" in loss:
        lines.append(f"  final loss vs Gflops: Spearman {loss['spearman']:.2f}")
    if summary.get("by_variant"):
        lines.append("  by variant (each fitted on its own trials):")
        lines += describe_variants(summary["by_variant"])
    iso = summary.get("isoflop", {})
    if "optima" in iso:
        optima = [f"{o['optimal_params'] / 1e6:.3g}M params at {o['compute_flops']:.2g} FLOPs" for o in iso["optima"]]
        lines.append("  isoFLOP optimum: " + ", ".join(optima))
    elif iso:
        lines.append(f"  isoFLOP optimum: none ({iso['skipped']})")
    return "\n".join(lines)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


def _markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = [
        "| " + " | ".join(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows]) + "\n"


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The FID-vs-Gflops fit as metrics for the sweep's run (none when there is no fit)."""
    f = summary["fid_vs_gflops"]
    per_variant = {
        f"scaling_fid_gflops_b.{variant}": entry["fid_vs_gflops"]["b"]
        for variant, entry in summary.get("by_variant", {}).get("variants", {}).items()
        if "b" in entry["fid_vs_gflops"]
    }
    if "skipped" in f:
        return per_variant
    return {
        **per_variant,
        "scaling_fid_gflops_b": f["b"],
        "scaling_fid_gflops_b_lo": f["b_ci"][0],
        "scaling_fid_gflops_b_hi": f["b_ci"][1],
        "scaling_fid_gflops_a": f["a"],
        "scaling_fid_gflops_pearson_r": f["pearson_r_log_gflops"],
    }
