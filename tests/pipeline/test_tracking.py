"""MLflow tracking: the embedded server serves, waiting for it depends on progress, its supervisor gives up after a
bound, it dies with its owner; MetricLogger loses no point to a dead server, a checkpoint followed by a kill, a full
queue or a torn spill file, and sets aside a point MLflow refuses for good."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.tracking import EmbeddedServerGaveUp, MetricLogger, embedded_server, wait_until_serving
from pipeline.tracking.spill import SpillFile
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]

SLOW_SERVER = r"""
import http.server, sys, time
port = int(sys.argv[1])
end = time.process_time() + float(sys.argv[2])
while time.process_time() < end:  # a start that takes longer than the stall timeout, busy all along
    pass
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def start(code: str, *args: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=log, stderr=subprocess.STDOUT)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_server_serves_the_tracking_api(tmp_path):
    with embedded_server(str(tmp_path)) as uri:
        with urllib.request.urlopen(f"{uri}/health", timeout=10) as response:
            assert response.status == 200
        exp_id = tracking.experiment_id(uri, "t")
        run = tracking.client(uri).create_run(exp_id)
        logger = tracking.MetricLogger(uri, run.info.run_id)
        logger.log({"loss": 0.5}, step=3)
        assert logger.close() == 0
        artifact = tmp_path / "a.txt"
        artifact.write_text("x")
        tracking.log_artifact(uri, run.info.run_id, str(artifact))
        assert tracking.metric_history(uri, run.info.run_id, "loss") == [(3, 0.5)]
        assert [a.path for a in tracking.client(uri).list_artifacts(run.info.run_id)] == ["a.txt"]
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlartifacts").is_dir()


def test_a_server_that_dies_fails_the_wait_at_once_with_its_log(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = start("print('cannot open the store: disk full', flush=True); raise SystemExit(3)", log=log)
    with pytest.raises(RuntimeError, match=r"exited with code 3[\s\S]*cannot open the store: disk full"):
        wait_until_serving(proc, f"http://127.0.0.1:{free_port()}", log_path, stall_timeout_s=3600)


def test_a_slow_start_is_waited_for_while_it_makes_progress(tmp_path):
    log_path, port = tmp_path / "server.log", free_port()
    with open(log_path, "w") as log:
        proc = start(SLOW_SERVER, str(port), "4", log=log)  # 4 s of CPU before it listens
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}", log_path, stall_timeout_s=2)  # longer than any stall
    finally:
        proc.kill()
        proc.wait()


def test_a_server_that_hangs_idle_fails_the_wait(tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = start("import time; print('waiting for a lock', flush=True); time.sleep(600)", log=log)
    try:
        with pytest.raises(RuntimeError, match=r"no progress for 2 s[\s\S]*waiting for a lock"):
            wait_until_serving(proc, f"http://127.0.0.1:{free_port()}", log_path, stall_timeout_s=2)
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# The supervisor and the server's lifetime
# ---------------------------------------------------------------------------------------------------------------

FAKE_SERVER = r"""
import http.server, os, sys
from pathlib import Path
port, folder = int(sys.argv[1]), Path(sys.argv[2])
if (folder / "broken").exists():  # every start after the first: dies at once, as over a damaged store
    print("cannot open the store: database disk image is malformed", flush=True)
    raise SystemExit(3)
(folder / "server.pid").write_text(str(os.getpid()))
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def test_the_supervisor_backs_off_then_gives_up_with_a_clear_error_at_the_exit(tmp_path, monkeypatch, capfd):
    command = lambda db, artifacts, port: [sys.executable, "-c", FAKE_SERVER, str(port), str(tmp_path)]  # noqa: E731
    monkeypatch.setattr(tracking.server, "server_command", command)
    err = []
    said = lambda what: err.append(capfd.readouterr().err) or what in "".join(err)  # noqa: E731
    with pytest.raises(EmbeddedServerGaveUp, match=r"after 2 restarts in the last 600 s[\s\S]*malformed") as caught:
        with embedded_server(str(tmp_path), max_restarts=2, restart_backoff_s=(0.05, 0.1)):
            (tmp_path / "broken").touch()
            first = int((tmp_path / "server.pid").read_text())
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: said("giving up"), "the supervisor to give up", stall_s=120)
    out = "".join(err)
    assert f"the embedded server (pid {first}) exited" in out and out.count("restart failed") == 2
    assert "run the same command again" in str(caught.value)


def serving_pids(db: Path) -> list[int]:
    """The live processes serving the MLflow store `db` (python -m pipeline.tracking serve <db> ...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and b"pipeline.tracking" in words and str(db).encode() in words and not zombie:
            pids.append(int(proc.name))
    return pids


OWNER = r"""
import sys, time
from pipeline.tracking import embedded_server
with embedded_server(sys.argv[1]) as uri:
    print(uri, flush=True)
    time.sleep(3600)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_sigkilled_owner_leaves_no_server_behind(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    db = tmp_path / "mlflow.db"
    try:
        assert owner.stdout.readline().startswith("http://127.0.0.1:")  # serving (or the owner failed: "")
        (server,) = serving_pids(db)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not serving_pids(db), f"the server (pid {server}) to exit with its owner", stall_s=60)
    finally:
        owner.kill()
        for pid in serving_pids(db):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# MetricLogger
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def unreachable(monkeypatch) -> str:
    """A tracking URI nobody serves; MLflow's client fails at once on it instead of retrying for minutes."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return f"http://127.0.0.1:{free_port()}"


def new_run(uri: str) -> str:
    return tracking.client(uri).create_run(tracking.experiment_id(uri, "tracking-tests")).info.run_id


def spilled_points(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


BARRIER_THEN_KILLED = r"""
import sys
from pipeline.tracking import MetricLogger
logger = MetricLogger(sys.argv[1], sys.argv[2], spill=sys.argv[3])
for step in range(1, 8):
    logger.log({"loss": 1.0 / step, "lr": 1e-4 * step, "grad_norm": 2.0}, step=step)
print(logger.checkpoint_barrier(timeout_s=60), flush=True)  # then the checkpoint report, then a SIGKILL
sys.stdin.read()
"""


def test_a_checkpoint_barrier_spills_what_mlflow_has_not_taken_and_the_next_run_sends_it(
    mlflow_uri, unreachable, tmp_path
):
    run_id, spill = new_run(mlflow_uri), tmp_path / "unsent_metrics.jsonl"
    worker = subprocess.Popen(
        [sys.executable, "-c", BARRIER_THEN_KILLED, unreachable, run_id, str(spill)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline().strip() == "21"  # 7 steps x 3 metrics, all spilled before it returned
        assert spilled_points(spill) == 21
    finally:
        worker.kill()  # SIGKILL right after the checkpoint
        worker.wait()
    logger = MetricLogger(mlflow_uri, run_id, spill=str(spill))  # the trial's next run, MLflow back
    assert logger.replayed == 21
    assert logger.flush(timeout_s=120) and logger.close() == 0
    for key in ("loss", "lr", "grad_norm"):
        assert [s for s, _ in tracking.metric_history(mlflow_uri, run_id, key)] == list(range(1, 8)), key
    assert not spill.exists()  # removed once every point in it was sent


def test_a_point_mlflow_refuses_for_good_is_set_aside_and_the_others_arrive(mlflow_uri, capfd):
    run_id, gone = new_run(mlflow_uri), new_run(mlflow_uri)
    tracking.client(mlflow_uri).delete_run(gone)
    logger, orphan = MetricLogger(mlflow_uri, run_id), MetricLogger(mlflow_uri, gone)
    orphan.log({"loss": 1.0, "mse": 2.0}, step=1)
    logger.log({"loss": 1.0, "bad name?": 2.0}, step=1)  # MLflow refuses that name
    logger.log({"loss": 0.5, "mse": 0.25, "note": "not a number"}, step=2)
    assert logger.flush(timeout_s=120) and orphan.flush(timeout_s=120)
    assert logger.close() == 0 and orphan.close() == 0
    assert logger.refused == 2 and orphan.refused == 2
    assert tracking.metric_history(mlflow_uri, run_id, "loss") == [(1, 1.0), (2, 0.5)]
    assert tracking.metric_history(mlflow_uri, run_id, "mse") == [(2, 0.25)]
    err = capfd.readouterr().err
    assert "refused for good (INVALID_PARAMETER_VALUE" in err and "bad name? at step 1" in err
    assert "note='not a number' at step 2" in err and "loss, mse at step 1 (2 points)" in err


def test_past_the_queue_bound_the_oldest_points_are_spilled_not_held_in_memory(mlflow_uri, unreachable, tmp_path):
    run_id, spill = new_run(mlflow_uri), tmp_path / "unsent_metrics.jsonl"
    logger = MetricLogger(unreachable, run_id, spill=str(spill), give_up_s=0, max_queued_points=100)
    longest = 0
    for step in range(1, 1001):
        logger.log({"loss": 1.0 / step}, step=step)
        longest = max(longest, len(logger.pending))
    assert longest <= 100 and spilled_points(spill) >= 900
    assert logger.close() == 1000  # MLflow never answered: every point is in the spill file, once
    assert spilled_points(spill) == 1000
    replay = MetricLogger(mlflow_uri, run_id, spill=str(spill))
    assert replay.flush(timeout_s=120) and replay.close() == 0
    assert [s for s, _ in tracking.metric_history(mlflow_uri, run_id, "loss")] == list(range(1, 1001))


def test_a_spill_file_with_a_torn_last_line_is_read_with_a_warning(mlflow_uri, tmp_path, capfd):
    run_id, spill = new_run(mlflow_uri), tmp_path / "unsent_metrics.jsonl"
    whole = [json.dumps({"key": "loss", "value": 1.0 / s, "timestamp": 1_000 + s, "step": s}) + "\n" for s in (1, 2, 3)]
    spill.write_text("".join(whole) + '{"key": "loss", "val')  # killed while appending its fourth line
    logger = MetricLogger(mlflow_uri, run_id, spill=str(spill))
    assert "skipped line 4 of" in capfd.readouterr().err and logger.replayed == 3
    assert logger.flush(timeout_s=120) and logger.close() == 0
    assert tracking.metric_history(mlflow_uri, run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert not spill.exists()


def test_an_append_after_a_torn_line_starts_a_line_of_its_own(tmp_path):
    from mlflow.entities import Metric

    path = tmp_path / "unsent_metrics.jsonl"
    path.write_text(json.dumps({"key": "loss", "value": 1.0, "timestamp": 1, "step": 1}) + '\n{"key": "lo')
    SpillFile(str(path)).append([Metric("loss", 0.5, 2, 2), Metric("mse", 0.25, 2, 2)])
    points, _ = SpillFile(str(path)).read(0, 10)
    assert [(m.key, m.step) for m in points] == [("loss", 1), ("loss", 2), ("mse", 2)]
