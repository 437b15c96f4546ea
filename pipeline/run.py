"""Building an experiment's data when it is missing: toy images (if asked for) and shards, each step skipped when
its output already exists (both stages are themselves idempotent and resumable)."""

from __future__ import annotations

from typing import Any

from pipeline.codecs import CodecConfig
from pipeline.config import ConfigError, ExperimentConfig, resolve_path
from pipeline.prepare import PrepareConfig, prepare, read_manifest
from pipeline.toy import ToyDataConfig, write_toy_dataset


def _source_folder(experiment: ExperimentConfig, workdir: str, source: str | None, val: bool) -> str | None:
    """The image folder to prepare from: the configured one, or toy data written under the workspace."""
    d = experiment.data
    if source != "toy":
        return resolve_path(workdir, source) if source else None
    per_class = d.toy_val_per_class if val else d.toy_per_class
    seed = d.toy_seed + 1 if val else d.toy_seed
    toy = ToyDataConfig(num_classes=d.toy_classes, per_class=per_class, resolution=d.resolution, seed=seed,
                        style=d.toy_style)  # fmt: skip
    folder = resolve_path(workdir, f"toy/{d.toy_style}{d.resolution}-c{d.toy_classes}-n{per_class}-s{seed}")
    write_toy_dataset(folder, toy)
    return folder


def ensure_data(experiment: ExperimentConfig, workdir: str, progress: bool = True) -> dict[str, Any]:
    """Make sure data.shards (and data.val_shards) exist and are complete; returns the training manifest."""
    d = experiment.data
    codec = CodecConfig(kind=d.codec, vae=d.vae, space_to_depth=d.space_to_depth)
    built = {}
    for shards, source, val in ((d.shards, d.source, False), (d.val_shards, d.val_source, True)):
        if shards is None:
            continue
        out = resolve_path(workdir, shards)
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("complete"):
            built[val] = manifest
            continue
        folder = _source_folder(experiment, workdir, source, val)
        if folder is None:
            raise ConfigError(
                f"no shards at {out} and no data.{'val_source' if val else 'source'} to make them from: "
                f"set it to an image folder (ImageNet layout) or 'toy', or run `ditscale prepare SRC {out}`"
            )
        config = PrepareConfig(resolution=d.resolution, codec=codec, samples_per_shard=d.samples_per_shard)
        built[val] = prepare(folder, out, config, progress=progress)
    return built[False]


def run_all(experiment: ExperimentConfig, workdir: str, step: int | None = None) -> dict[str, Any]:
    """toy data (if asked for) -> prepare -> sweep -> fid -> analyze, each skipping work already done.

    One MLflow server (or MLFLOW_TRACKING_URI) serves every stage. Returns the analysis summary (or its error).
    """
    import os
    import time

    from analysis.fits import FitError
    from analysis.report import analyze
    from pipeline import tracking
    from pipeline.fid import run_fid
    from pipeline.sweep import run_sweep, storage_path

    start = time.perf_counter()
    ensure_data(experiment, workdir)
    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = uri  # every stage logs through this one server
        try:
            outcomes = run_sweep(experiment, workdir)
            run_fid(experiment, workdir)
            exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
            parent = tracking.find_run(uri, exp_id, {tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: experiment.name})
            out = f"{workdir}/analysis/{experiment.name}"
            try:
                summary = analyze(uri, experiment.mlflow_experiment, out, step, parent.info.run_id,
                                  paper_grid=experiment.name == "paper_grid", sweep=experiment.name)  # fmt: skip
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
    print(
        f"\nditscale run {experiment.name}: done in {minutes:.1f} min"
        + (f"; failed trials: {failed}" if failed else "")
    )
    print(f"  figures and tables  {out}/  (fid_vs_gflops.png, fid_vs_steps.png, samples/, table4.md, summary.json)")
    storage = storage_path(experiment, workdir)
    print(f"  checkpoints         {storage}/<run>/checkpoint_*/, EMA milestones in <run>/milestones/")
    if experiment.tracking.tracking_uri or previous:
        print(f"  MLflow              {experiment.tracking.tracking_uri or previous}")
    else:
        print(f"  MLflow store        {workdir}/mlflow.db (artifacts: {workdir}/mlartifacts)")
        print(f"  open the MLflow UI  {tracking.ui_command(workdir)}")
        print(f"                      then http://127.0.0.1:5000/#/experiments/{exp_id}/runs (the sweep's runs)")
    summary["minutes"] = minutes
    return summary
