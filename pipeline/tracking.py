"""The one module that talks to MLflow: the embedded server, sweep (parent) and trial (child) runs, logging.

Where runs go: `tracking.tracking_uri` of the experiment, else MLFLOW_TRACKING_URI, else an MLflow tracking server
that this module starts on 127.0.0.1 over `<workdir>/mlflow.db` (SQLite) with artifacts in `<workdir>/mlartifacts`,
so that many processes (Ray workers, concurrent trials) can log at once. On a multi-node cluster, point
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

from pipeline.layout import Workspace

TAG_ROLE = "ditscale.role"
TAG_SWEEP = "ditscale.sweep"
TAG_RUN_NAME = "ditscale.run_name"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server_command(db: str | Path, artifacts: str | Path, port: int) -> list[str]:
    """`mlflow server` over the SQLite file `db` and the artifact folder `artifacts`, on 127.0.0.1:`port`."""
    return [
        "server",
        "--backend-store-uri",
        f"sqlite:///{db}",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def ui_command(workdir: str) -> str:
    """The command that opens the MLflow UI over the embedded store of `workdir`."""
    ws = Workspace(workdir)
    beside = Path(sys.executable).parent / "mlflow"  # this environment's mlflow, even when it is not on PATH
    mlflow = str(beside) if beside.exists() and shutil.which("mlflow") != str(beside) else "mlflow"
    return " ".join([mlflow, *mlflow_server_command(ws.mlflow_db, ws.mlflow_artifacts, 5000)])


# What the embedded server needs of MLflow: the tracking app alone, in one process. `mlflow server` would import
# MLflow three times (its CLI, the uvicorn worker, the job runner for GenAI features that a training study does not
# use): 15-18 s to answer on an idle 2-core machine, against 5.5-8.6 s for this (benchmarks/mlflow_startup.py).
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner processes
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no network calls from an air-gapped machine
    "DO_NOT_TRACK": "true",
}


def serve(db: str, artifacts: str, port: int) -> None:
    """Run MLflow's tracking server (the FastAPI app) in this process on 127.0.0.1:`port` over the SQLite file `db`,
    serving artifacts from the folder `artifacts`, as `mlflow server --backend-store-uri sqlite:///db
    --artifacts-destination artifacts --workers 1` does. Falls back to that command on an MLflow whose server
    internals differ."""
    os.environ.update(SERVER_ENV)
    backend, artifact_root = f"sqlite:///{db}", "mlflow-artifacts:/"  # (the artifact root `mlflow server` uses)
    start = time.perf_counter()
    phase = lambda what: print(f"[{time.perf_counter() - start:6.2f} s] {what}", flush=True)  # noqa: E731
    try:
        import mlflow.server as server
        from mlflow.server.handlers import initialize_backend_stores

        phase("imported mlflow")

        os.environ.update(
            {
                server.BACKEND_STORE_URI_ENV_VAR: backend,
                server.REGISTRY_STORE_URI_ENV_VAR: backend,
                server.ARTIFACT_ROOT_ENV_VAR: artifact_root,
                server.SERVE_ARTIFACTS_ENV_VAR: "true",
                server.ARTIFACTS_DESTINATION_ENV_VAR: artifacts,
            }
        )
        initialize_backend_stores(backend, backend, artifact_root)
        phase(f"initialised the store {backend}")
        import uvicorn
        from mlflow.server.fastapi_app import app

        phase("imported the tracking app; serving")
    except (ImportError, AttributeError) as exc:
        print(f"falling back to `mlflow server` ({type(exc).__name__}: {exc})", flush=True)
        cmd = [sys.executable, "-m", "mlflow", *mlflow_server_command(db, artifacts, port), "--workers", "1"]
        os.execv(sys.executable, cmd)
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 where /proc is not available)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_serving(proc: subprocess.Popen, uri: str, log: Path, stall_timeout_s: float = 120.0) -> None:
    """Wait for `proc` to answer `uri`/health. The wait has no fixed deadline, since a busy machine can make a start
    take minutes: it goes on while the process is alive and making progress (its log grows or it uses CPU), fails at
    once with the log's last lines if the process exits, and fails if it makes no progress for `stall_timeout_s`."""
    last_progress, last_seen = time.monotonic(), (-1, -1.0)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the MLflow server exited with code {proc.returncode} before serving; last lines of "
                f"{log}:\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        seen = (log.stat().st_size if log.exists() else 0, _cpu_seconds(proc.pid))
        if seen != last_seen:
            last_progress, last_seen = time.monotonic(), seen
        elif time.monotonic() - last_progress > stall_timeout_s:
            raise RuntimeError(
                f"the MLflow server made no progress for {stall_timeout_s:.0f} s (alive, idle, not "
                f"serving); last lines of {log}:\n{_tail(log)}"
            )
        time.sleep(0.25)


@contextlib.contextmanager
def embedded_server(workdir: str, stall_timeout_s: float = 120.0) -> Iterator[str]:
    """Run an MLflow tracking server on 127.0.0.1 over the workspace's store; yields its http:// URI; stops it on
    exit."""
    ws = Workspace(workdir)
    if not ws.is_local:
        raise ValueError(
            f"the embedded MLflow store needs a local workspace, not {workdir}: set MLFLOW_TRACKING_URI to your "
            f"MLflow server"
        )
    ws.mlflow_db.parent.mkdir(parents=True, exist_ok=True)
    ws.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # the port found free may be taken before the server binds it
        port = _free_port()
        uri = f"http://127.0.0.1:{port}"
        start = ws.mlflow_log.stat().st_size if ws.mlflow_log.exists() else 0
        with open(ws.mlflow_log, "ab") as log:
            cmd = [
                sys.executable,
                "-m",
                "pipeline.tracking",
                "serve",
                str(ws.mlflow_db),
                str(ws.mlflow_artifacts),
                str(port),
            ]
            env = {**os.environ, **SERVER_ENV}
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=str(Path(__file__).resolve().parents[1]),
            )
        try:
            wait_until_serving(proc, uri, ws.mlflow_log, stall_timeout_s)
            break
        except RuntimeError:
            _stop(proc)
            new_lines = ws.mlflow_log.read_bytes()[start:].decode(errors="replace")
            if "address already in use" not in new_lines.lower() or attempt == 2:
                raise
    try:
        yield uri
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


def log_analysis(uri: str, run_id: str, folder: str, metrics: dict[str, float], step: int) -> None:
    """The analysis folder as artifacts under `analysis/` of the sweep's run, and its headline fits as metrics."""
    c = client(uri)
    c.log_artifacts(run_id, folder, "analysis")
    for key, value in metrics.items():
        c.log_metric(run_id, key, float(value), step=step)


if __name__ == "__main__":  # python -m pipeline.tracking serve DB ARTIFACTS PORT (what embedded_server starts)
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        sys.exit("usage: python -m pipeline.tracking serve DB ARTIFACTS PORT")
    serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
