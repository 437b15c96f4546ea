"""The embedded MLflow server: where runs go when no tracking URI is given, and the supervisor that keeps it up.

`tracking_uri` is the configured URI, else MLFLOW_TRACKING_URI, else `embedded_server`: `python -m pipeline.tracking
serve` on 127.0.0.1 over `<workdir>/mlflow.db` (SQLite) with artifacts in `<workdir>/mlartifacts`, so that many
processes (Ray workers, concurrent trials) log through one server.

Three promises:
- a slow start is waited for while it makes progress (`wait_until_serving`), never against a fixed deadline;
- a server that dies is started again on the same port, after an exponential backoff, at most `max_restarts` times in
  `restart_window_s`; past that the supervisor gives up and `embedded_server` raises EmbeddedServerGaveUp at its exit
  (the metric loggers meanwhile keep what they could not send in their spill files);
- the server dies with the process that started it (`die_with_owner`), so a SIGKILLed sweep leaves no server holding
  the SQLite store.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

# (pipeline.layout is imported where it is used: `python -m pipeline.tracking serve` then loads no torch.)


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
    from pipeline.layout import Workspace

    ws = Workspace(workdir)
    beside = Path(sys.executable).parent / "mlflow"  # this environment's mlflow, even when it is not on PATH
    mlflow = str(beside) if beside.exists() and shutil.which("mlflow") != str(beside) else "mlflow"
    return " ".join([mlflow, *mlflow_server_command(ws.mlflow_db, ws.mlflow_artifacts, 5000)])


# ---------------------------------------------------------------------------------------------------------------
# The server process: python -m pipeline.tracking serve DB ARTIFACTS PORT OWNER_PID
# ---------------------------------------------------------------------------------------------------------------

# What the embedded server needs of MLflow: the tracking app alone, in one process. `mlflow server` would import
# MLflow three times (its CLI, the uvicorn worker, the job runner for GenAI features that a training study does not
# use): 15-18 s to answer on an idle 2-core machine, against 5.5-8.6 s for this (benchmarks/mlflow_startup.py).
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner processes
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no network calls from an air-gapped machine
    "DO_NOT_TRACK": "true",
}
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies


def die_with_owner(owner_pid: int, poll_s: float = 1.0) -> None:
    """Make this process exit when `owner_pid`, the process that started it, is gone. Linux: the parent-death signal
    (SIGKILL; it follows the thread that started the process, so a server the supervisor's thread started again dies
    when that thread ends, at stop). Everywhere, and as a backstop (the signal is armed only once this runs): a daemon
    thread that exits the process when its parent pid is no longer `owner_pid`."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == owner_pid:
            time.sleep(poll_s)
        print(f"the process that started this server ({owner_pid}) is gone; exiting", flush=True)
        os._exit(0)

    if os.getppid() != owner_pid:  # gone before the signal was armed
        watch()
    threading.Thread(target=watch, name="ditscale-owner-watch", daemon=True).start()


def serve(db: str, artifacts: str, port: int, owner_pid: int | None = None) -> None:
    """Run MLflow's tracking server (the FastAPI app) in this process on 127.0.0.1:`port` over the SQLite file `db`,
    serving artifacts from the folder `artifacts`, as `mlflow server --backend-store-uri sqlite:///db
    --artifacts-destination artifacts --workers 1` does; it exits when `owner_pid` does. Falls back to that command
    on an MLflow whose server internals differ (the parent-death signal still holds; the pid watch does not)."""
    if owner_pid is not None:
        die_with_owner(owner_pid)
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


# ---------------------------------------------------------------------------------------------------------------
# Starting it and waiting for it
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def server_command(db: Path, artifacts: Path, port: int) -> list[str]:
    """The embedded server's command line: this package's `serve`, told to exit with this process."""
    return [sys.executable, "-m", "pipeline.tracking", "serve", str(db), str(artifacts), str(port), str(os.getpid())]


def _start_server(db: Path, artifacts: Path, log_path: Path, port: int, stall_timeout_s: float) -> subprocess.Popen:
    """Start the server over `db` on 127.0.0.1:`port` and wait until it answers; RuntimeError (with its log) if it
    cannot."""
    start = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            server_command(db, artifacts, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal stops the study, which then stops the server
            env={**os.environ, **SERVER_ENV},
            cwd=str(Path(__file__).resolve().parents[2]),
        )
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}", log_path, stall_timeout_s)
    except RuntimeError as exc:
        _stop(proc)
        exc.port_in_use = "address already in use" in log_path.read_bytes()[start:].decode(errors="replace").lower()
        raise
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# The supervisor
# ---------------------------------------------------------------------------------------------------------------


class EmbeddedServerGaveUp(RuntimeError):
    """The embedded MLflow server died more often than the supervisor's bound; it is not started again."""


class Supervisor:
    """Keeps the embedded server up: a thread that starts it again (with `start`, on the same port, so every process
    logging to its URI reaches it again) whenever it exits before it is told to stop. Metric points logged meanwhile
    wait in their MetricLogger's queue, or its spill file, and are sent when it is back.

    Before restart k within the last `restart_window_s` it waits min(cap, base * 2**k) seconds (`backoff_s` =
    (base, cap)); when `max_restarts` restarts in that window have not kept it up, it gives up: `error` is set and
    printed at once, and `stop` raises it.
    """

    def __init__(
        self,
        start: Callable[[], subprocess.Popen],
        proc: subprocess.Popen,
        log: Path,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        backoff_s: tuple[float, float] = (1.0, 60.0),
        poll_s: float = 1.0,
    ):
        self.start, self.proc, self.log, self.poll_s = start, proc, log, poll_s
        self.max_restarts, self.restart_window_s, self.backoff_s = max_restarts, restart_window_s, backoff_s
        self.restarts: collections.deque[float] = collections.deque()  # when each recent restart began
        self.error: EmbeddedServerGaveUp | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ditscale-mlflow-supervisor", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopping.wait(self.poll_s):
            code = self.proc.poll()
            if code is None:
                continue
            _say(
                f"the embedded server (pid {self.proc.pid}) exited with code {code}; starting it again "
                f"(metrics wait meanwhile; none is lost)"
            )
            if not self._restart():
                return

    def _restart(self) -> bool:
        """Start the server again, with backoff; False once stopping or given up."""
        while not self.stopping.is_set():
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > self.restart_window_s:
                self.restarts.popleft()
            if len(self.restarts) >= self.max_restarts:
                self.error = EmbeddedServerGaveUp(
                    f"the embedded MLflow server died again after {len(self.restarts)} restarts in the last "
                    f"{self.restart_window_s:.0f} s; giving up, it is not started again. Metric points not sent "
                    f"are kept in each trial's unsent_metrics.jsonl and sent by its next run. Find the cause in "
                    f"{self.log} (a full disk, a locked or damaged mlflow.db), then run the same command again: it "
                    f"resumes. Last lines of the log:\n{_tail(self.log)}"
                )
                _say(str(self.error))
                return False
            base, cap = self.backoff_s
            if self.stopping.wait(min(cap, base * 2 ** len(self.restarts))):
                return False
            self.restarts.append(time.monotonic())
            try:
                self.proc = self.start()
            except (RuntimeError, OSError) as exc:
                _say(f"restart failed: {exc}")
                continue
            _say(f"serving again (pid {self.proc.pid})")
            return True
        return False

    def stop(self) -> None:
        """Stop watching and stop the server; raises EmbeddedServerGaveUp if the supervisor gave up."""
        self.stopping.set()
        self.thread.join()
        _stop(self.proc)
        if self.error is not None:
            raise self.error


def _say(what: str) -> None:
    print(f"MLflow: {what}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def embedded_server(
    workdir: str,
    stall_timeout_s: float = 120.0,
    max_restarts: int = 5,
    restart_window_s: float = 600.0,
    restart_backoff_s: tuple[float, float] = (1.0, 60.0),
) -> Iterator[str]:
    """Run an MLflow tracking server on 127.0.0.1 over the workspace's store; yields its http:// URI; stops it on
    exit. The server exits with this process even when it is killed. A supervisor starts it again if it dies (see
    Supervisor for `max_restarts`, `restart_window_s` and `restart_backoff_s` = (base, cap) seconds); if it gives up,
    the exit raises EmbeddedServerGaveUp (after any error of the body, which it then carries as its context)."""
    from pipeline.layout import Workspace

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
        start = functools.partial(
            _start_server, ws.mlflow_db, ws.mlflow_artifacts, ws.mlflow_log, port, stall_timeout_s
        )
        try:
            proc = start()
            break
        except RuntimeError as exc:
            if not getattr(exc, "port_in_use", False) or attempt == 2:
                raise
    supervisor = Supervisor(start, proc, ws.mlflow_log, max_restarts, restart_window_s, restart_backoff_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        supervisor.stop()


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
    from pipeline.layout import Workspace

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
