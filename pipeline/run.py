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
    """toy data (if asked for) -> prepare -> sweep, with the fid stage on fid.schedule (as each milestone lands,
    "spare"; in each trial's slot when it has trained, "between"; after the sweep, "after") -> analyze, each skipping
    work already done.

    Holds the study's lock throughout; one MLflow server (or MLFLOW_TRACKING_URI) serves every stage. Returns the
    analysis summary (or its error), with the run's timeline. Raises KeyboardInterrupt after a clean stop on Ctrl-C.
    """
    from analysis.fits import FitError
    from pipeline import tracking
    from pipeline.analyze import analyze_experiment
    from pipeline.fid.study import FidErrors, ScoringWhileTraining, StudyScorer, run_fid, score_trial
    from pipeline.lock import study_lock
    from pipeline.plan import plan_sweep
    from pipeline.ray_utils import ensure_ray
    from pipeline.sweep import command_line, run_sweep

    start, workspace = time.time(), Workspace(workdir)
    marks: dict[str, float] = {"start": start}
    fid_errors = None
    with study_lock(workspace.lock(experiment.name), command_line()) as lock:
        ensure_data(experiment, workdir)
        marks["data"] = time.time()
        with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
            lock.update(tracking_uri=uri)
            previous = os.environ.get("MLFLOW_TRACKING_URI")
            os.environ["MLFLOW_TRACKING_URI"] = uri  # every stage logs through this one server
            try:
                plan = plan_sweep(experiment, workdir)
                training = any(plan.state(t).to_train for t in plan.trials)
                schedule = experiment.fid.schedule if training else "after"
                if schedule == "spare":  # actors beside the trials, scoring each milestone as it lands
                    ensure_ray()
                    with ScoringWhileTraining(experiment, workdir, uri, plan=plan) as scoring:
                        outcomes = run_sweep(experiment, workdir, reserved=scoring.reserved, plan=plan)
                        marks["sweep"] = time.time()
                        try:
                            if not scoring.finish():
                                print("fid: nothing new to score")
                        except FidErrors as exc:
                            fid_errors = exc
                else:
                    if schedule == "between":  # extractor and reference statistics ready before the first trial
                        ensure_ray()
                        with StudyScorer(experiment, workdir, uri, progress=False, plan=plan) as scorer:
                            scorer.warm_up()
                    in_slot = score_trial if schedule == "between" else None
                    outcomes = run_sweep(experiment, workdir, after_training=in_slot, plan=plan)
                    marks["sweep"] = time.time()
                    try:  # "after": everything; "between": what the trials could not score in their slots
                        run_fid(experiment, workdir, plan=plan)
                    except FidErrors as exc:
                        fid_errors = exc
                marks["fid"] = time.time()
                if fid_errors is not None:
                    print(f"fid: {fid_errors}")
                exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
                try:
                    summary = analyze_experiment(experiment, workdir, step)
                except FitError as exc:
                    summary = {"error": str(exc)}
                    print(f"analyze: {exc}")
                marks["analysis"] = time.time()
            finally:
                if previous is None:
                    os.environ.pop("MLFLOW_TRACKING_URI", None)
                else:
                    os.environ["MLFLOW_TRACKING_URI"] = previous
    marks["end"] = time.time()
    minutes = (marks["end"] - start) / 60
    failed = [o.trial.run_name for o in outcomes if o.status != "done"]
    print(f"\nditscale run {experiment.name}: done in {minutes:.1f} min" + (f"; failed: {failed}" if failed else ""))
    summary["timeline"] = timeline(marks, [workspace.trial(experiment.name, o.trial.run_name) for o in outcomes])
    print("  " + describe_timeline(summary["timeline"]))
    if fid_errors is not None:
        summary["fid_errors"] = str(fid_errors)
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
    summary["failed_trials"] = failed
    return summary


def timeline(marks: dict[str, float], trials: list) -> dict[str, float]:
    """Seconds from the start of the run to the end of each phase, and the tail: from the end of the last trial
    that trained in this run (its finished marker) to the end of the run."""
    start = marks["start"]
    out = {f"{k}_s": round(v - start, 1) for k, v in marks.items() if k != "start"}
    ended = [(t.done_record() or {}).get("finished_unix_s") for t in trials]
    ended = [e for e in ended if e is not None and e >= start]
    if ended:
        out["last_trial_end_s"] = round(max(ended) - start, 1)
        out["tail_s"] = round(marks["end"] - max(ended), 1)
        out["tail_share"] = round(out["tail_s"] / max(1e-9, marks["end"] - start), 4)
    return out


def describe_timeline(t: dict[str, float]) -> str:
    phases = f"data ready at {t['data_s']:.0f} s, sweep done at {t['sweep_s']:.0f} s, FID at {t['fid_s']:.0f} s, "
    phases += f"analysis at {t['analysis_s']:.0f} s, end at {t['end_s']:.0f} s"
    if "tail_s" not in t:
        return f"timeline: {phases} (no trial trained in this run)"
    return (
        f"timeline: {phases}; the last trial ended at {t['last_trial_end_s']:.0f} s, {t['tail_s']:.0f} s "
        f"({t['tail_share']:.0%} of the run) before the end"
    )
