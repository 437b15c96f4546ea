"""The README's cluster path, for real: a head started with `ray start --head`, token authentication, a small
`ditscale run` submitted with `ray job submit --working-dir .`, its runs read back from MLflow.

The cluster is this test's own: a temporary HOME (so the token it generates is not the user's), its own temp dir
and ports on 127.0.0.1, and it is stopped by killing the `ray start --block` process group that owns it and any
process that names its temp dir: that cluster's processes and nothing else (`ray stop` would stop every Ray instance
on the machine).
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import newest_change, trial_runs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB = [
    "ditscale",
    "run",
    "smoke",
    "--set",
    "name=cluster-smoke",
    "grid.presets=[DiT-d2w64/8]",
    "train.steps=10",
    "train.milestone_steps=[10]",
    "train.ckpt_every_steps=10",
    "train.val_every_steps=10",
    "fid.extractor=ditscale-classifier",
    "fid.classifier_steps=50",
    "fid.num_samples=150",
    "fid.sampler=ddim",
    "fid.sampling_steps=5",
    "fid.slice_size=75",
    "fid.batch_size=75",
]


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def processes_of(temp_dir: Path) -> list[int]:
    """The processes whose command line names this cluster's temp dir (its GCS, raylet, dashboard, agents)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def ray_cli(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(
            f"ray {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


@contextlib.contextmanager
def start_head(tmp_path):
    """A Ray head on 127.0.0.1 with token authentication; yields (dashboard address, client environment, its temp
    dir), and stops that cluster, and only it, on the way out."""
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = Path("/tmp") / f"ray-ditscale-{os.getpid()}-{time.monotonic_ns() % 10**8}"  # short: socket paths
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    ray_cli("get-auth-token", "--generate", env=env)  # writes $HOME/.ray/auth_token, as the README says
    assert (home / ".ray" / "auth_token").is_file()
    gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--ray-client-server-port",
        str(client),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--temp-dir",
        str(temp_dir),
        "--num-cpus",
        "2",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # up when its job server answers; fails when `ray start` exits or its log and temp dir stop changing
        seen, progress_at = 0.0, time.monotonic()
        while ray_cli("job", "list", "--address", address, env=env, check=False).returncode:
            assert proc.poll() is None, (tmp_path / "ray-start.log").read_text()[-3000:]
            newest = max(newest_change(temp_dir), (tmp_path / "ray-start.log").stat().st_mtime)
            if newest > seen:
                seen, progress_at = newest, time.monotonic()
            stalled = time.monotonic() - progress_at > 300
            assert not stalled, "the head stopped making progress:\n" + (tmp_path / "ray-start.log").read_text()[-3000:]
            time.sleep(2)
        yield address, env, temp_dir
    finally:
        # This cluster's processes, and only these: its `ray start --block` group, then whatever names its temp dir
        # (a graceful stop would take half a minute, and nothing of the test cluster is kept)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in processes_of(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_a_study_on_a_token_authenticated_cluster(ray_session, tmp_path):
    with start_head(tmp_path) as (address, env, temp_dir):
        submit_and_check(address, env, tmp_path / "work")
    # the cluster is gone, and nothing else was stopped: the test session's own Ray still works
    assert not processes_of(temp_dir)
    assert ray_session.get(ray_session.put(41)) + 1 == 42


def submit_and_check(address: str, env: dict, workdir: Path) -> None:
    """`ray job submit` the study, wait for it (progress-based), and read its runs back from MLflow."""
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = ray_cli("job", "list", "--address", address, env=without_token, check=False)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()  # the token is required

    job_id = f"ditscale-test-{os.getpid()}"
    submit = ["job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", job_id, "--no-wait"]
    deadline = time.monotonic() + 1800  # (a guard, not a speed requirement)
    while True:  # the job server answers before the node's job agent is up: "try again later" means that
        submitted = ray_cli(*submit, "--", *JOB, "--workdir", str(workdir), env=env, timeout=300, check=False)
        if submitted.returncode == 0 or "try again later" not in submitted.stdout + submitted.stderr:
            break
        assert time.monotonic() < deadline, submitted.stderr[-3000:]
        time.sleep(5)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status, seen, progress_at = "", 0.0, time.monotonic()
    while not any(word in status for word in ("succeeded", "failed", "stopped")):
        # no deadline: the wait fails only when the job's workspace stops changing for 10 minutes (a hang)
        newest = newest_change(workdir)
        if newest > seen:
            seen, progress_at = newest, time.monotonic()
        stalled = time.monotonic() - progress_at > 600
        assert not stalled, ray_cli("job", "logs", "--address", address, job_id, env=env).stdout[-6000:]
        time.sleep(5)
        status = ray_cli("job", "status", "--address", address, job_id, env=env).stdout.lower()
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
    assert f"job '{job_id}' succeeded" in status, status + logs[-6000:]
    assert "1/1 trials done" in logs and "ditscale run cluster-smoke: done" in logs

    from pipeline import schema, tracking

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    exp_id = tracking.experiment_id(uri, "cluster-smoke")
    parent = tracking.find_run(uri, exp_id, {schema.ROLE: schema.ROLE_SWEEP, schema.SWEEP: "cluster-smoke"})
    children = trial_runs(uri, "cluster-smoke")
    assert parent is not None and parent.info.status == "FINISHED" and len(children) == 1
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.params["preset"] == "DiT-d2w64/8"
    assert [s for s, _ in tracking.metric_history(uri, child.info.run_id, "loss")][-1] == 10
    assert [s for s, _ in tracking.metric_history(uri, child.info.run_id, "fid")] == [10]
