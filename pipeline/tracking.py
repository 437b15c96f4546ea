"""The one module that talks to MLflow: the embedded server, sweep (parent) and trial (child) runs, logging.

Where runs go: `tracking.tracking_uri` of the experiment, else MLFLOW_TRACKING_URI, else an `mlflow server` that
this module starts on 127.0.0.1 over `<workdir>/mlflow.db` (SQLite) with artifacts in `<workdir>/mlartifacts`, so
that many processes (Ray workers, concurrent trials) can log at once. On a multi-node cluster, point
MLFLOW_TRACKING_URI at a server every node can reach.

Runs are found again by tags, so re-running a sweep logs into the same parent run and the same child runs:
    ditscale.role = sweep | trial, ditscale.sweep = <experiment name>, ditscale.run_name = <trial run name>.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TAG_ROLE = "ditscale.role"
TAG_SWEEP = "ditscale.sweep"
TAG_RUN_NAME = "ditscale.run_name"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_paths(workdir: str) -> tuple[Path, Path]:
    """(SQLite file, artifact folder) of the embedded store in a local workspace."""
    return Path(workdir) / "mlflow.db", Path(workdir) / "mlartifacts"


def ui_command(workdir: str) -> str:
    """The command that opens the MLflow UI over the embedded store of `workdir`."""
    db, artifacts = store_paths(workdir)
    beside = Path(sys.executable).parent / "mlflow"  # this environment's mlflow, even when it is not on PATH
    mlflow = str(beside) if beside.exists() and shutil.which("mlflow") != str(beside) else "mlflow"
    return (
        f"{mlflow} server --backend-store-uri sqlite:///{db} --artifacts-destination {artifacts} "
        f"--host 127.0.0.1 --port 5000"
    )


@contextlib.contextmanager
def embedded_server(workdir: str, startup_timeout_s: float = 90.0) -> Iterator[str]:
    """Run `mlflow server` on 127.0.0.1 over the workspace's store; yields its http:// URI; stops it on exit."""
    if "://" in workdir:
        raise ValueError(
            f"the embedded MLflow store needs a local workspace, not {workdir}: set MLFLOW_TRACKING_URI to your "
            f"MLflow server"
        )
    db, artifacts = store_paths(workdir)
    db.parent.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(Path(workdir) / "mlflow-server.log", "ab")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start within {startup_timeout_s:.0f} s; see {log.name}")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def tracking_uri(configured: str, workdir: str) -> Iterator[str]:
    """The tracking URI to use: the configured one, MLFLOW_TRACKING_URI, or an embedded server for the duration."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        yield uri
        return
    with embedded_server(workdir) as uri:
        yield uri


def client(uri: str):
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run at ..." lines
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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
    found = find_run(uri, exp_id, {TAG_ROLE: "sweep", TAG_SWEEP: sweep})
    c = client(uri)
    if found is not None:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(exp_id, run_name=f"sweep:{sweep}", tags={TAG_ROLE: "sweep", TAG_SWEEP: sweep}).info.run_id
        log_params(uri, run_id, params)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    return run_id


def trial_run(
    uri: str, exp_id: str, parent_id: str, sweep: str, name: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """The child run of a trial: found by its run name, or created under the sweep's run with `params`."""
    found = find_run(uri, exp_id, {TAG_ROLE: "trial", TAG_RUN_NAME: name})
    c = client(uri)
    if found is not None:
        return found.info.run_id
    run_tags = {TAG_ROLE: "trial", TAG_SWEEP: sweep, TAG_RUN_NAME: name, TAG_PARENT: parent_id, **tags}
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


def run_status(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.status


def log_artifact(uri: str, run_id: str, path: str, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, path, artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


class MetricLogger:
    """Logs metric dicts at a step to one run (used by rank 0 of a trial)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order."""
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def trial_runs(uri: str, exp_id: str, sweep: str) -> list:
    """All child runs of a sweep."""
    return client(uri).search_runs(
        [exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_SWEEP}` = '{sweep}'", max_results=10000
    )
