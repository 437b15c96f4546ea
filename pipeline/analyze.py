"""The analyze stage: the analysis package's figures, tables and fits for an experiment, logged to its sweep's run.

    ditscale analyze quickstart [--step 600] [--out FOLDER]

`analysis.report.analyze` reads MLflow and writes the folder; this stage finds the sweep's parent run and logs the
folder and the headline fits to it through pipeline.tracking. `ditscale analyze` and `ditscale run` both call
`analyze_experiment`.
"""

from __future__ import annotations

from typing import Any

from pipeline import schema, tracking
from pipeline.config import ExperimentConfig
from pipeline.layout import Workspace


def analyze_experiment(
    experiment: ExperimentConfig, workdir: str, step: int | None = None, out: str | None = None
) -> dict[str, Any]:
    """Write the experiment's analysis to `out` (default <workdir>/analysis/<name>) and log it to the sweep's run
    when there is one; returns the summary (with "out", and "logged_to" = the run id or None)."""
    from analysis.report import analyze

    out = out or Workspace(workdir).analysis(experiment.name)
    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        parent = tracking.find_run(uri, exp_id, {schema.ROLE: schema.ROLE_SWEEP, schema.SWEEP: experiment.name})
        summary = analyze(uri, experiment.mlflow_experiment, out, step, experiment.analysis, sweep=experiment.name)
        if parent is not None:
            tracking.log_analysis(uri, parent.info.run_id, out, summary["metrics"], summary["step"])
    summary["out"] = out
    summary["logged_to"] = parent.info.run_id if parent is not None else None
    return summary
