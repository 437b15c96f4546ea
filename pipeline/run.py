"""`ditscale run`: the whole study, toy data (if asked for) -> prepare -> sweep -> fid -> analyze, each step skipping
work already done (every stage is itself idempotent and resumable)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.layout import Workspace
from pipeline.manifest import Manifest
from pipeline.prepare import prepare
from pipeline.toy import write_toy_dataset


def _source_folder(experiment: ExperimentConfig, workspace: Workspace, source: str | None, val: bool) -> str | None:
    """The image folder to prepare from: the configured one, or toy data written under the workspace."""
    if source != "toy":
        return workspace.path(source) if source else None
    d = experiment.data
    toy = replace(d.toy, per_class=d.toy_val_per_class, seed=d.toy.seed + 1) if val else d.toy
    folder = workspace.toy(toy.style, toy.resolution, toy.num_classes, toy.per_class, toy.seed)
    write_toy_dataset(folder, toy)
    return folder


def ensure_data(experiment: ExperimentConfig, workdir: str, progress: bool = True) -> Manifest:
    """Make sure data.shards (and data.val_shards) exist and are complete; returns the training manifest."""
    d, workspace = experiment.data, Workspace(workdir)
    built = {}
    for shards, source, val in ((d.shards, d.source, False), (d.val_shards, d.val_source, True)):
        if shards is None:
            continue
        out = workspace.path(shards)
        manifest = Manifest.read(out)
        if manifest is not None and manifest.complete:
            built[val] = manifest
            continue
        folder = _source_folder(experiment, workspace, source, val)
        if folder is None:
            raise ConfigError(
                f"no shards at {out} and no data.{'val_source' if val else 'source'} to make them from: "
                f"set it to an image folder (ImageNet layout) or 'toy', or run `ditscale prepare SRC {out}`"
            )
        built[val] = prepare(folder, out, d.prepare, progress=progress)
    return built[False]


def run_all(experiment: ExperimentConfig, workdir: str, step: int | None = None) -> dict[str, Any]:
    """toy data (if asked for) -> prepare -> sweep -> fid -> analyze, each skipping work already done.

    One MLflow server (or MLFLOW_TRACKING_URI) serves every stage. Returns the analysis summary (or its error).
    """
    from analysis.fits import FitError
    from pipeline import tracking
    from pipeline.analyze import analyze_experiment
    from pipeline.fid.score import run_fid
    from pipeline.sweep import run_sweep

    start, workspace = time.perf_counter(), Workspace(workdir)
    ensure_data(experiment, workdir)
    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri  # every stage logs through this one server
        try:
            outcomes = run_sweep(experiment, workdir)
            run_fid(experiment, workdir)
            exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
            try:
                summary = analyze_experiment(experiment, workdir, step)
            except FitError as exc:
                summary = {"error": str(exc)}
                print(f"analyze: {exc}")
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
    minutes = (time.perf_counter() - start) / 60
    failed = [o.trial.run_name for o in outcomes if o.status != "done"]
    print(f"\nditscale run {experiment.name}: done in {minutes:.1f} min" + (f"; failed: {failed}" if failed else ""))
    print(
        f"  figures and tables  {workspace.analysis(experiment.name)}/  (fid_vs_gflops.png, fid_vs_steps.png, "
        f"samples/, table4.md, summary.json)"
    )
    print(f"  report              {workspace.analysis(experiment.name)}/report.html (self-contained; report.md)")
    print(
        f"  checkpoints         {workspace.runs(experiment.name)}/<run>/checkpoint_*/, EMA milestones in "
        f"<run>/milestones/"
    )
    if experiment.tracking.tracking_uri or previous:
        print(f"  MLflow              {experiment.tracking.tracking_uri or previous}")
    else:
        print(f"  MLflow store        {workspace.mlflow_db} (artifacts: {workspace.mlflow_artifacts})")
        print(f"  open the MLflow UI  {tracking.ui_command(workdir)}")
        print(f"                      then http://127.0.0.1:5000/#/experiments/{exp_id}/runs (the sweep's runs)")
    summary["minutes"] = minutes
    return summary
