"""The one module that talks to MLflow: the embedded server, sweep (parent) and trial (child) runs, logging.

Where runs go: `tracking.tracking_uri` of the experiment, else MLFLOW_TRACKING_URI, else an MLflow tracking server
that this module starts on 127.0.0.1 over `<workdir>/mlflow.db` (SQLite) with artifacts in `<workdir>/mlartifacts`,
so that many processes (Ray workers, concurrent trials) can log at once. On a multi-node cluster, point
MLFLOW_TRACKING_URI at a server every node can reach.

Runs are found again by tags, so re-running a sweep logs into the same parent run and the same child runs:
    ditscale.role = sweep | trial, ditscale.sweep = <experiment name>, ditscale.run_name = <trial run name>.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.layout import Workspace
from pipeline.storage import remove

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


def _start_server(ws: Workspace, port: int, stall_timeout_s: float) -> subprocess.Popen:
    """Start `python -m pipeline.tracking serve` over the workspace's store on 127.0.0.1:`port` and wait until it
    answers; RuntimeError (with its log) if it cannot."""
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
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **SERVER_ENV},
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    try:
        wait_until_serving(proc, uri, ws.mlflow_log, stall_timeout_s)
    except RuntimeError as exc:
        _stop(proc)
        exc.port_in_use = (
            "address already in use" in ws.mlflow_log.read_bytes()[start:].decode(errors="replace").lower()
        )
        raise
    return proc


class _Supervisor:
    """Keeps the embedded server up: a thread that starts it again, on the same port (so every process logging to
    its URI reaches it again), whenever it exits before it is told to stop. Metric points logged meanwhile wait in
    their MetricLogger's queue and are sent when it is back."""

    def __init__(self, ws: Workspace, port: int, proc: subprocess.Popen, stall_timeout_s: float):
        self.ws, self.port, self.proc, self.stall_timeout_s = ws, port, proc, stall_timeout_s
        self.restarts = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ditscale-mlflow-supervisor", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            code = self.proc.poll()
            if code is None:
                continue
            print(
                f"MLflow: the embedded server (pid {self.proc.pid}) exited with code {code}; starting it again on "
                f"port {self.port} (metrics wait meanwhile; none is lost)",
                file=sys.stderr,
                flush=True,
            )
            while not self.stopping.is_set():
                try:
                    self.proc = _start_server(self.ws, self.port, self.stall_timeout_s)
                    self.restarts += 1
                    print(f"MLflow: serving again (pid {self.proc.pid})", file=sys.stderr, flush=True)
                    break
                except RuntimeError as exc:
                    print(f"MLflow: restart failed, trying again in 5 s: {exc}", file=sys.stderr, flush=True)
                    self.stopping.wait(5.0)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        _stop(self.proc)


@contextlib.contextmanager
def embedded_server(workdir: str, stall_timeout_s: float = 120.0) -> Iterator[str]:
    """Run an MLflow tracking server on 127.0.0.1 over the workspace's store, kept up by a supervisor (it is started
    again if it dies); yields its http:// URI; stops it on exit."""
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
        try:
            proc = _start_server(ws, port, stall_timeout_s)
            break
        except RuntimeError as exc:
            if not getattr(exc, "port_in_use", False) or attempt == 2:
                raise
    supervisor = _Supervisor(ws, port, proc, stall_timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        supervisor.stop()


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


def reading_uri(configured: str, workdir: str, running: str | None = None) -> str | None:
    """Where to read a study's runs without starting anything: the configured URI or MLFLOW_TRACKING_URI, the server
    of the study at work (`running`) when it answers, else the workspace's SQLite store (None if there is none)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if running:
        try:
            with urllib.request.urlopen(f"{running}/health", timeout=5) as response:
                if response.status == 200:
                    return running
        except OSError:
            pass
    ws = Workspace(workdir)
    return f"sqlite:///{ws.mlflow_db}" if ws.is_local and ws.mlflow_db.exists() else None


def trial_runs_by_name(uri: str, experiment_name: str, sweep: str) -> dict[str, Any]:
    """{run name: MLflow run} of a sweep's trials; {} if the experiment does not exist (nothing is created)."""
    c = client(uri)
    experiment = c.get_experiment_by_name(experiment_name)
    if experiment is None:
        return {}
    query = f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_SWEEP}` = '{sweep}'"
    runs = c.search_runs([experiment.experiment_id], filter_string=query, max_results=10_000)
    return {run.data.tags[TAG_RUN_NAME]: run for run in runs}


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
    """Logs metric dicts at a step to one run, from a thread of its own, and never loses a point.

    `log` only queues the points, so the training loop never waits on MLflow. The thread sends them in order; a batch
    MLflow does not take (the server restarting, the network) is retried with backoff until it is taken. MLflow's
    store drops an exact duplicate, so a batch sent twice is stored once. `close` waits for the queue to drain; what
    is still unsent after `give_up_s` without a successful send goes to the `spill` file (JSON lines), and the next
    MetricLogger with that spill file sends it first.
    """

    def __init__(self, uri: str, run_id: str, spill: str | None = None, give_up_s: float = 600.0):
        self.client, self.run_id, self.spill, self.give_up_s = client(uri), run_id, spill, give_up_s
        self.pending: collections.deque = collections.deque()  # Metric points not yet taken by MLflow, in order
        self.lock = threading.Condition()
        self.closing = False
        self.failures = 0  # failed sends so far (each retried)
        self.last_error: str | None = None
        self.last_success = time.monotonic()
        if spill:
            self.pending.extend(_read_spill(spill))
        self.replayed = len(self.pending)
        self.thread = threading.Thread(target=self._send_loop, name="ditscale-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        with self.lock:
            self.pending.extend(items)
            self.lock.notify_all()

    def _send_loop(self) -> None:
        backoff = 0.5
        while True:
            with self.lock:
                while not self.pending and not self.closing:
                    self.lock.wait()
                if not self.pending and self.closing:
                    return
                batch = list(itertools.islice(self.pending, 0, 1000))  # MLflow takes at most 1000 per call
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # noqa: BLE001 (any failure: keep the points and try again)
                with self.lock:
                    self.failures += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    if self.closing and time.monotonic() - self.last_success > self.give_up_s:
                        return  # close() spills what is left
                    self.lock.wait(backoff)
                backoff = min(10.0, backoff * 2)
                continue
            backoff = 0.5
            with self.lock:
                for _ in batch:
                    self.pending.popleft()
                self.last_success = time.monotonic()
                if self.replayed:
                    self.replayed = max(0, self.replayed - len(batch))
                    if self.replayed == 0 and self.spill:
                        remove(self.spill)  # the replayed points are in MLflow now
                self.lock.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued point is in MLflow (at most `timeout_s`); True if they all are."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.lock:
            while self.pending and self.thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.lock.wait(1.0 if left is None else min(1.0, left))
            return not self.pending

    def close(self) -> int:
        """Send what is queued (waiting while MLflow makes progress, up to `give_up_s` after its last success); spill
        the rest to the spill file. Returns the number of points spilled (0: everything reached MLflow)."""
        with self.lock:
            self.closing = True
            self.lock.notify_all()
        self.thread.join()
        left = list(self.pending)
        if left and self.spill:
            _write_spill(self.spill, left)
            print(
                f"MLflow took no metric for {self.give_up_s:.0f} s ({self.last_error}): {len(left)} points kept in "
                f"{self.spill}, sent by the next run of this trial",
                flush=True,
            )
        return len(left)


def _read_spill(path: str) -> list:
    import fsspec
    from mlflow.entities import Metric

    fs, target = fsspec.core.url_to_fs(path)
    if not fs.exists(target):
        return []
    with fs.open(target, "r") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [Metric(d["key"], d["value"], d["timestamp"], d["step"]) for d in lines]


def _write_spill(path: str, metrics: list) -> None:
    import fsspec

    fs, target = fsspec.core.url_to_fs(path)
    with fs.open(target, "w") as f:  # everything unsent, the replayed points included
        for m in metrics:
            f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")


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
