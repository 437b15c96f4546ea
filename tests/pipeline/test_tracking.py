"""The embedded MLflow server: it serves, and waiting for it depends on progress, not on a fixed deadline."""

import subprocess
import sys
import urllib.request

import pytest

from pipeline.tracking import embedded_server, wait_until_serving

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
        from pipeline import tracking

        exp_id = tracking.experiment_id(uri, "t")
        run = tracking.client(uri).create_run(exp_id)
        tracking.MetricLogger(uri, run.info.run_id).log({"loss": 0.5}, step=3)
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
