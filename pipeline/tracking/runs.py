"""MLflow runs of a study: found again by their tags, created when missing, and written and read through MLflow's
client (params, tags, status, artifacts, metric histories).

Runs are found again by tags, so re-running a sweep logs into the same parent run and the same child runs:
    ditscale.role = sweep | trial, ditscale.sweep = <experiment name>, ditscale.run_name = <trial run name>.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import schema

TAG_ROLE, TAG_SWEEP, TAG_RUN_NAME, TAG_PARENT = schema.ROLE, schema.SWEEP, schema.RUN_NAME, schema.PARENT
MAX_PARAM_LENGTH = 6000


def client(uri: str):
    """MLflow's client of the tracking server or store at `uri`."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at ..." lines
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def trial_runs_by_name(uri: str, experiment_name: str, sweep: str) -> dict[str, Any]:
    """{run name: MLflow run} of a sweep's trials; {} if the experiment does not exist (nothing is created)."""
    c = client(uri)
    experiment = c.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    query = f"tags.`{TAG_ROLE}` = '{schema.ROLE_TRIAL}' and tags.`{TAG_SWEEP}` = '{sweep}'"
    runs = c.search_runs([experiment.experiment_id], filter_string=query, max_results=10_000)
    return {run.data.tags[TAG_RUN_NAME]: run for run in runs}


# Marks the experiment as model training (not GenAI traces) for MLflow 3's UI, which picks its pages by this tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(uri: str, name: str) -> str:
    """The id of the MLflow experiment `name`, created (or restored) if needed, marked as model training."""
    c = client(uri)
    experiment = c.get_experiment_by_name(name)
    if experiment is None:
        try:
            c.create_experiment(name, tags=EXPERIMENT_KIND)
        except Exception:  # created concurrently
            pass
        experiment = c.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        c.restore_experiment(experiment.experiment_id)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) is None:  # a kind the user chose in the UI is kept
            c.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def find_run(uri: str, exp_id: str, tags: dict[str, str]):
    filters = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(uri).search_runs([exp_id], filter_string=filters, max_results=2, order_by=["attributes.start_time"])
    return runs[0] if runs else None


def sweep_run(uri: str, exp_id: str, sweep: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """The parent run of a sweep: found by its tags, or created with `params`."""
    found = find_run(uri, exp_id, {TAG_ROLE: schema.ROLE_SWEEP, TAG_SWEEP: sweep})
    c = client(uri)
    if found is not None:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(
            exp_id, run_name=f"sweep:{sweep}", tags={TAG_ROLE: schema.ROLE_SWEEP, TAG_SWEEP: sweep}
        ).info.run_id
        log_params(uri, run_id, params)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    return run_id


def trial_run(
    uri: str, exp_id: str, parent_id: str, sweep: str, name: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """The child run of a trial: found by its run name, or created under the sweep's run with `params`."""
    found = find_run(uri, exp_id, {TAG_ROLE: schema.ROLE_TRIAL, TAG_RUN_NAME: name})
    c = client(uri)
    if found is not None:
        return found.info.run_id
    run_tags = {TAG_ROLE: schema.ROLE_TRIAL, TAG_SWEEP: sweep, TAG_RUN_NAME: name, TAG_PARENT: parent_id, **tags}
    run_id = c.create_run(exp_id, run_name=name, tags=run_tags).info.run_id
    log_params(uri, run_id, params)
    return run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
    for lo in range(0, len(items), 100):
        client(uri).log_batch(run_id, params=items[lo : lo + 100])


def set_status(uri: str, run_id: str, status: str) -> None:
    """status: RUNNING, FINISHED, FAILED or KILLED."""
    if status == "RUNNING":
        client(uri).update_run(run_id, status="RUNNING")
    else:
        client(uri).set_terminated(run_id, status=status)


def log_artifact(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, path, artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def log_analysis(uri: str, run_id: str, folder: str, metrics: dict[str, float], step: int) -> None:
    """The analysis folder as artifacts under `analysis/` of the sweep's run, and its headline fits as metrics."""
    c = client(uri)
    c.log_artifacts(run_id, folder, "analysis")
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step)
