"""analyze: MLflow -> tidy frame -> fits, figures and tables in a folder.

    ditscale analyze quickstart [--step 600]

Prints the fitted exponent of FID = a * Gflops^b at the chosen step with its 95% interval and the
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
from analysis.document import markdown_table, sections, write_report
from analysis.laws import HeldOut, held_out
from analysis.loader import load_runs
from analysis.study import final_points, replicate_points
from analysis.summary import Summary, summarize
from analysis.variants import variants_table

# Table 4 of the paper (ImageNet 256, 400K steps, no guidance, FID-50K).
PAPER_TABLE4 = pd.DataFrame(
    [("DiT-S/8", 0.36, 153.60), ("DiT-S/4", 1.41, 100.41), ("DiT-S/2", 6.06, 68.40),
     ("DiT-B/8", 1.42, 122.74), ("DiT-B/4", 5.56, 68.38), ("DiT-B/2", 23.01, 43.47),
     ("DiT-L/8", 5.01, 118.87), ("DiT-L/4", 19.70, 45.64), ("DiT-L/2", 80.71, 23.33),
     ("DiT-XL/8", 7.39, 106.41), ("DiT-XL/4", 29.05, 43.01), ("DiT-XL/2", 118.64, 19.47)],
    columns=["preset", "gflops", "fid"],
)  # fmt: skip


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
    step, points, fits = summary.step, summary.points, summary.fits
    at = points[points["step"] == step]
    fid_fit, samples = fits.get("fid_vs_gflops", (None, None))
    figures = [
        plots.fid_vs_steps(points, out),
        plots.fid_vs_gflops(at, out, step, fid_fit, samples, summary.correlation, PUBLISHED.get(config.reference)),
        plots.fid_vs_compute(points, out, fits["fid_vs_compute"][0] if "fid_vs_compute" in fits else None),
    ]
    if len(curves):
        figures.append(plots.loss_curves(replicate_points(curves, ("loss",)), out))
    paper, paper_check = paper_held_out()
    figures += _prediction_figures(summary, curves, out, paper_check)
    if summary.variants is not None:
        best_at = summary.best[summary.best["step"] == step]
        figures.append(plots.variants_fid_vs_gflops(best_at, out, step, summary.variants.fid))
        if len(curves):
            figures.append(plots.variants_loss_vs_compute(final_points(curves), out, summary.variants.loss))
        table = variants_table(summary.variants.json)
        table.to_csv(out / "variants.csv", index=False)
        (out / "variants.md").write_text(markdown_table(table))
    figures += _sample_grids(tracking_uri, at.merge(_one_run_per_model(summary.best, step), on="label"), out,
                             step, notes)  # fmt: skip
    table = table4(at, config.reference == "dit-table4")
    table.to_csv(out / "table4.csv", index=False)
    (out / "table4.md").write_text(markdown_table(table))
    if summary.ema_table is not None:
        summary.ema_table.to_csv(out / "ema_decays.csv", index=False)
    public = {**summary.json, "paper_table4_held_out": paper, "notes": notes}
    (out / "summary.json").write_text(json.dumps(public, indent=2, default=_json))
    print(describe(public))
    public["figures"] = figures
    public["report"] = write_report(public, table, summary.ema_table, figures, out, experiment_name)
    public["metrics"] = headline_metrics(public)
    return public


def _json(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _one_run_per_model(best: pd.DataFrame, step: int) -> pd.DataFrame:
    """For each model the run (first seed) and EMA whose sample grid the report shows (`best`: each model's rows at
    its chosen EMA)."""
    rows = best[best["step"] == step].sort_values("seed").drop_duplicates("label")
    return rows[["label", "run_id", "run_name", "ema_name"]]


def paper_held_out() -> tuple[dict[str, Any], HeldOut]:
    """The paper's Table 4: a power law fitted on the eleven models other than DiT-XL/2 predicts XL/2's FID (its
    summary entry, and the check for the figure)."""
    check = held_out(PAPER_TABLE4["gflops"], PAPER_TABLE4["fid"], holdout=1)
    entry = {
        "predicted": check.predicted[0],
        "interval": check.interval[0],
        "measured": check.measured[0],
        "error": check.errors[0],
        "inside": check.inside[0],
        "note": "fitted on the 11 models other than DiT-XL/2 (FID-50K at 400K steps); patch size and width do not "
        "trade at the same rate per Gflop, so one power law over both misses the largest model",
    }
    return entry, check


def _prediction_figures(summary: Summary, curves: pd.DataFrame, out: Path, paper: HeldOut) -> list[str]:
    """Residuals of every fit, the held-out check (and the paper's), L(C), isoFLOP profiles, EMAs, sampling compute,
    hyperparameter sensitivity, FD_DINOv2: each where its fit exists."""
    objects, step, points, figures = summary.fits, summary.step, summary.points, []
    at = points[points["step"] == step]
    final = final_points(curves)
    checks = {}
    for metric in ("fid", "fd_dinov2"):
        if f"{metric}_vs_gflops" in objects:
            fit = objects[f"{metric}_vs_gflops"][0]
            rows = at[at[metric].notna()]
            name = "FID" if metric == "fid" else "FD_DINOv2"
            checks[f"{name} vs Gflops at step {step:,} (means)"] = (rows["gflops"], rows[metric], fit(rows["gflops"]))
    if "fid_vs_compute" in objects:
        fit, _, frontier = objects["fid_vs_compute"]
        x = frontier["compute_flops"]
        checks["FID vs training compute (frontier)"] = (x, frontier["fid"], fit(x))
    if "loss_vs_compute" in objects:
        law, x = objects["loss_vs_compute"], final["compute_flops"]
        checks["L(C) = E + A C^-alpha (final losses)"] = (x, final["loss"], law(x))
    if "isoflop" in objects:
        f = objects["isoflop"][0]
        c, n = np.array(f.optima).T
        checks["isoFLOP: N_opt vs C"] = (c, n, f.n_opt(c))
    if "parametric" in objects:
        p = objects["parametric"]
        rows = curves[np.isfinite(curves["loss"]) & (curves["step"] > 0)]
        tokens = rows["compute_flops"] / (6 * rows["params"])
        checks["L(N, D) (every logged step)"] = (rows["compute_flops"], rows["loss"], p(rows["params"], tokens))
    if checks:
        figures.append(plots.residuals(checks, out))
    paper_panel = (PAPER_TABLE4["gflops"], PAPER_TABLE4["fid"], paper, "the paper's Table 4: XL/2 from the other 11")
    if "fid_held_out" in objects:
        figures.append(plots.held_out(at["gflops"], at["fid"], objects["fid_held_out"], out,
                                      f"this study: the largest model from the others (step {step:,})", "held_out",
                                      paper_panel))  # fmt: skip
    if "loss_vs_compute" in objects:
        figures.append(plots.loss_law(final, objects["loss_vs_compute"], out))
    if "isoflop" in objects:
        figures.append(plots.isoflop(*objects["isoflop"], out))
    if summary.ema_table is not None:
        gflops = points.groupby("label")["gflops"].first()
        figures.append(plots.emas(summary.ema_table, gflops, out))
    sampling = summary.json.get("sampling", {})
    if "frontier" in sampling:
        figures.append(plots.sampling_compute(at, sampling["frontier"], out))
    if summary.sensitivity is not None:
        axis = summary.json["hyperparameters"]["axes"][0]
        figures.append(plots.hyperparameters(summary.sensitivity, f"axis.{axis}", out))
    if "fd_dinov2_vs_gflops" in objects:
        fit, samples = objects["fd_dinov2_vs_gflops"]
        figures.append(plots.fid_vs_gflops(at, out, step, fit, samples, metric="fd_dinov2"))
    return figures


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
    lines.append(f"  seeds {summary['replicates']['seeds']}: {summary['replicates']['note']}")
    if "ema" in summary:
        used = ", ".join(f"{k} {v:g}" for k, v in summary["ema"]["chosen"].items())
        lines.append(f"  EMA decays {summary['ema']['decays']}; each model at its best: {used}")
    for heading, paragraphs, _ in sections(summary)[2:]:
        lines.append(f"  {heading}:")
        lines += [f"    {p}" for p in paragraphs]
    return "\n".join(lines)


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
