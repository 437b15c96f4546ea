"""The faults a long study meets, each caused for real on a local Ray and a real MLflow server: a diverging trial, a
corrupt latest checkpoint, more steps on a finished sweep, Ctrl-C (on a sweep, and on `ditscale run` with its scoring
thread), the MLflow server killed, a node lost. Where the timing matters, the recorder's test hook holds rank 0 at a
step (tests.helpers.TrialHold) while the fault is caused."""

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline import schema, tracking
from pipeline.experiment_files import load_experiment
from pipeline.plan import plan_sweep
from pipeline.run import run_all
from pipeline.status import gather, study_status
from pipeline.sweep import main_sweep, run_sweep
from pipeline.tracking.spill import SpillFile
from pipeline.trial_state import FailureKind, State
from tests.helpers import FAST_FID, TrialHold, process_state, registered_checkpoint, wait_for

ROOT = Path(__file__).resolve().parents[2]


def start_sweep(workdir: str, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`ditscale sweep smoke --workdir W --set ...` in a process group of its own (as a terminal would start it)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", "smoke", "--workdir", workdir]
    for item in overrides:
        cmd += ["--set", item]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def final_weights(layout) -> dict[str, torch.Tensor]:
    """The model and EMA weights of a trial's last checkpoint."""
    _, newest = layout.checkpoint_folders()[0]
    state = torch.load(f"{newest}/checkpoint.pt", weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


# ---------------------------------------------------------------------------------------------------------------
# A diverging trial
# ---------------------------------------------------------------------------------------------------------------

DIVERGING = [
    "name=faults-nan",
    "grid.presets=[DiT-d2w64/8]",
    "grid.axes={train.lr: [0.001, 10.0]}",  # AdamW at lr 10 blows the weights up within a few steps
    "train.steps=12",
    "train.ckpt_every_steps=3",  # the steps that synchronise anyway: 3, 6, 9, 12 (it diverges at step 4)
    "train.keep_checkpoints=2",
    "train.log_every_steps=100",
    "train.milestone_steps=[6, 12]",
    "train.val_every_steps=6",
]


def test_a_diverging_trial_stops_at_once_and_the_others_go_on(smoke_workdir, mlflow_uri, capsys):
    experiment = load_experiment("smoke", DIVERGING)
    assert main_sweep(experiment, smoke_workdir, dry_run=False) == 1  # the exit code says a trial failed
    out = capsys.readouterr().out
    plan = plan_sweep(experiment, smoke_workdir)
    stable, unstable = sorted(plan.trials, key=lambda t: t.experiment.train.lr)
    assert plan.layout(stable).done_step() == 12  # the other trial went on to the end

    failure = plan.layout(unstable).failure()
    assert failure.kind is FailureKind.DIVERGED and failure.reason.startswith(f"diverged at step {failure.step}:")
    assert 1 <= failure.step < 12 and plan.layout(unstable).done_step() is None
    # noticed within a step, not at the next log or checkpoint (measured: bad at 4, stopped at 5, where the check
    # at logs and checkpoints only stopped at 6): every step's loss is watched on the device
    assert failure.stopped_step - failure.step <= 1, failure
    assert f"failed: {failure.reason}" in out and "1 diverged" in out
    # no checkpoint or milestone with non-finite weights was written, so none can be the latest; the fallback
    # orders them by the step each holds
    folders = plan.layout(unstable).checkpoint_folders()
    assert folders and [step for step, _ in folders] == sorted((step for step, _ in folders), reverse=True)
    for step, folder in folders:
        state = torch.load(f"{folder}/checkpoint.pt", weights_only=True)
        assert state["step"] == step < failure.step
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(step < failure.step for step in plan.layout(unstable).milestones())

    client = tracking.client(mlflow_uri)
    exp_id = tracking.experiment_id(mlflow_uri, experiment.mlflow_experiment)
    runs = tracking.trial_runs_by_name(mlflow_uri, experiment.mlflow_experiment, experiment.name)
    bad = runs[unstable.run_name]
    assert bad.info.status == "FAILED" and bad.data.tags[schema.FAILURE] == failure.reason
    assert bad.data.tags[schema.FAILURE_KIND] == "diverged"
    assert runs[stable.run_name].info.status == "FINISHED"
    parent = tracking.find_run(mlflow_uri, exp_id, {tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: experiment.name})
    assert client.get_run(parent.info.run_id).info.status == "FAILED"

    # `ditscale status` lists it with its reason
    rows = {s.trial.run_name: s for s in gather(experiment, smoke_workdir).trials}
    assert rows[unstable.run_name].state is State.FAILED and rows[unstable.run_name].reason == failure.reason
    assert rows[stable.run_name].state == "done" and rows[stable.run_name].step == 12
    text = study_status(experiment, smoke_workdir)
    row = next(line for line in text.splitlines() if line.startswith(unstable.run_name))
    assert " failed " in row and failure.reason in row and "1 done, 1 failed of 2 trials" in text

    # A re-run does not train it again (it would diverge at the same step) and still says so.
    outcomes = run_sweep(experiment, smoke_workdir)
    assert "1 diverged earlier" in capsys.readouterr().out
    assert [o.status for o in sorted(outcomes, key=lambda o: o.trial.experiment.train.lr)] == ["done", "failed"]


def test_a_trial_that_fails_for_good_is_recorded_with_its_reason(smoke_workdir, mlflow_uri, tmp_path, capsys):
    """A shard cut short under the trial: its worker group fails, Ray Train restarts it (resources.max_failures=1),
    it fails again; the trial is then recorded as failed with the error's own words and its run is FAILED, and Tune
    does not start it a third time."""
    shards = tmp_path / "shards"
    shutil.copytree(f"{smoke_workdir}/shards/smoke", shards)
    for tar in shards.glob("train-*.tar"):
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    experiment = load_experiment(
        "smoke",
        ["name=faults-error", f"data.shards={shards}", "grid.presets=[DiT-d2w64/8]", "resources.max_failures=1"],
    )
    assert main_sweep(experiment, smoke_workdir, dry_run=False) == 1
    plan = plan_sweep(experiment, smoke_workdir)
    failure = plan.layout(plan.trials[0]).failure()
    assert failure.kind is FailureKind.ERROR and "truncated tar shard" in failure.reason
    assert "re-run `ditscale prepare`" in failure.reason  # the reader's own advice reaches the table
    assert f"failed: {failure.reason}" in capsys.readouterr().out
    (run,) = tracking.trial_runs_by_name(mlflow_uri, experiment.mlflow_experiment, experiment.name).values()
    assert run.info.status == "FAILED" and run.data.tags[schema.FAILURE] == failure.reason
    assert run.data.tags[schema.FAILURE_KIND] == "error"
    state = plan.state(plan.trials[0])  # failed, but not diverged: the same command tries it again
    assert state.state is State.FAILED and state.to_train


# ---------------------------------------------------------------------------------------------------------------
# More steps on a finished sweep; a corrupt latest checkpoint
# ---------------------------------------------------------------------------------------------------------------

CONTINUED = [
    "name=faults-resume",
    "grid.presets=[DiT-d2w64/8]",
    "train.ckpt_every_steps=10",
    "train.log_every_steps=5",
    "train.milestone_steps=[10]",
    "train.val_every_steps=10",
]


def test_more_steps_continue_a_finished_sweep_and_a_corrupt_checkpoint_falls_back(smoke_workdir, mlflow_uri):
    first = load_experiment("smoke", [*CONTINUED, "train.steps=20"])
    (done,) = run_sweep(first, smoke_workdir)
    assert done.status == "done" and done.step == 20
    layout = plan_sweep(first, smoke_workdir).layout(done.trial)

    # --set train.steps=30 on the finished sweep: the same run (a constant lr), continued from step 20
    more = load_experiment("smoke", [*CONTINUED, "train.steps=30"])
    (trial,) = plan_sweep(more, smoke_workdir).trials
    assert trial.run_name == done.trial.run_name
    (outcome,) = run_sweep(more, smoke_workdir)
    assert outcome.status == "done" and outcome.step == 30
    assert layout.worker(0)["start_step"] == 20 and not layout.worker(0)["skipped_checkpoints"]
    losses = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25, 30]  # nothing trained twice

    # The latest checkpoint (step 30) truncated, as by a process killed while writing it: the next resume warns and
    # falls back to step 20 instead of crashing or starting again from 0.
    newest = Path(layout.checkpoint_folders()[0][1]) / "checkpoint.pt"
    assert torch.load(newest, weights_only=True)["step"] == 30
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    again = load_experiment("smoke", [*CONTINUED, "train.steps=40"])
    (outcome,) = run_sweep(again, smoke_workdir)
    assert outcome.status == "done" and outcome.step == 40
    worker = layout.worker(0)
    assert worker["start_step"] == 20 and worker["restored_from"] != newest.parent.name
    assert [s["checkpoint"] for s in worker["skipped_checkpoints"]] == [newest.parent.name]
    assert "cannot read checkpoint" in worker["skipped_checkpoints"][0]["error"]
    run = tracking.client(mlflow_uri).get_run(outcome.mlflow_run_id)
    assert newest.parent.name in run.data.tags["ditscale.resume_warning"]
    history = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "loss")
    by_step = {}
    for step, value in history:
        by_step.setdefault(step, []).append(value)
    assert sorted(by_step) == [5, 10, 15, 20, 25, 30, 35, 40]
    # steps 21-30 ran twice, from the same checkpoint, data order and seeds: the same losses both times
    assert len(by_step[25]) == len(by_step[30]) == 2 and by_step[25][0] == by_step[25][1]
    assert by_step[30][0] == by_step[30][1]


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C, and a resume that continues exactly
# ---------------------------------------------------------------------------------------------------------------

INTERRUPTED = [
    "name=faults-sigint",
    "grid.presets=[DiT-d2w64/8]",
    "train.steps=16",
    "train.ckpt_every_steps=6",
    "train.log_every_steps=2",  # steps 7-8 are logged before the stop and, resumed from step 6, again after it
    "train.milestone_steps=[16]",
    "train.val_every_steps=8",
]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_cleanly_and_the_rerun_continues_as_if_never_stopped(smoke_workdir, mlflow_uri, tmp_path, ray_tmp):
    # The reference: the same trial trained without a stop (another experiment name: a folder of its own).
    reference = load_experiment("smoke", [*INTERRUPTED, "name=faults-straight"])
    (straight,) = run_sweep(reference, smoke_workdir)
    straight_layout = plan_sweep(reference, smoke_workdir).layout(straight.trial)

    experiment = load_experiment("smoke", INTERRUPTED)
    plan = plan_sweep(experiment, smoke_workdir)
    (trial,) = plan.trials
    layout = plan.layout(trial)
    # rank 0 held after step 8: steps 2-8 logged, the checkpoint of step 6 registered, mid-trial
    hold = TrialHold(tmp_path, 8)
    env = {**own_study_env(ray_tmp, **hold.env()), "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = start_sweep(smoke_workdir, INTERRUPTED, env)

    def logged_8() -> bool:
        runs = tracking.trial_runs_by_name(mlflow_uri, experiment.mlflow_experiment, experiment.name)
        run = runs.get(trial.run_name)
        return run is not None and 8 in dict(tracking.metric_history(mlflow_uri, run.info.run_id, "loss"))

    wait_for(lambda: hold.reached() and logged_8(), "rank 0 held after step 8, logged", proc, watch=plan.storage)
    assert registered_checkpoint(Path(layout.root))
    status = gather(experiment, smoke_workdir)  # while it trains
    assert status.live is not None and status.live.pid == proc.pid and status.trials[0].state == "running"

    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: a terminal signals the whole foreground process group
    out, err = proc.communicate(timeout=900)  # (a guard against a hang, not a speed requirement)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "interrupted" in err and "run the same command again" in err
    wait_for(lambda: not group_alive(proc.pid), "the sweep's processes to end", stall_s=120)
    assert layout.done_step() is None and plan.state(trial).state is State.STOPPED
    assert not Path(plan.workspace.lock(experiment.name)).exists()  # the lock went with it
    assert gather(experiment, smoke_workdir).trials[0].state == "stopped"
    # MLflow says so too: the trial's run and the sweep's run are KILLED, not RUNNING or FAILED
    run = tracking.trial_runs_by_name(mlflow_uri, experiment.mlflow_experiment, experiment.name)[trial.run_name]
    assert run.info.status == "KILLED"
    exp_id = tracking.experiment_id(mlflow_uri, experiment.mlflow_experiment)
    parent = tracking.find_run(mlflow_uri, exp_id, {schema.ROLE: schema.ROLE_SWEEP, schema.SWEEP: experiment.name})
    assert tracking.client(mlflow_uri).get_run(parent.info.run_id).info.status == "KILLED"

    (outcome,) = run_sweep(experiment, smoke_workdir)  # the same command again
    assert outcome.status == "done" and outcome.step == 16
    assert layout.worker(0)["start_step"] == 6  # resumed, not restarted
    # The same losses at every logged step (a window logged before the stop and again after it, twice) and the same
    # final weights as the run that never stopped: same step count, data order and randomness.
    expected = dict(tracking.metric_history(mlflow_uri, straight.mlflow_run_id, "loss"))
    history = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "loss")
    assert sorted({s for s, _ in history}) == sorted(expected) == list(range(2, 17, 2))
    assert [s for s, _ in history].count(8) == 2  # logged before the stop and again after the resume
    assert all(value == expected[step] for step, value in history)
    ours, theirs = final_weights(layout), final_weights(straight_layout)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------------------------
# The embedded MLflow server killed mid-sweep
# ---------------------------------------------------------------------------------------------------------------


def start_ditscale(command: str, workdir: Path, overrides: list[str], env: dict[str, str], logs: Path):
    """`ditscale <command> smoke --workdir W --set ...` in a process group of its own (as a terminal would start it),
    its output in logs/out.txt and logs/err.txt (a file never fills up and blocks the process, as an unread pipe
    would while the test holds it)."""
    cmd = [sys.executable, "-m", "pipeline.cli", command, "smoke", "--workdir", str(workdir)]
    for item in overrides:
        cmd += ["--set", item]
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "out.txt", "w") as out, open(logs / "err.txt", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=err, text=True)


@pytest.fixture
def ray_tmp():
    """A short folder of its own for the local Ray that a `ditscale` subprocess starts (RAY_TMPDIR): ray.init would
    join the cluster that /tmp/ray/ray_current_cluster names, left there by any other process of this machine."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def own_study_env(ray_tmp: str, **more: str) -> dict[str, str]:
    """This environment without MLFLOW_TRACKING_URI (the study starts its own embedded server over its workdir) or
    RAY_ADDRESS (it starts a local Ray in `ray_tmp`, whose workers inherit this environment: a TrialHold reaches
    them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "RAY_TMPDIR": ray_tmp, **more}


def server_pids(db: Path) -> list[int]:
    """The processes serving the MLflow store `db` (python -m pipeline.tracking serve <db> ...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"pipeline.tracking" in words and str(db).encode() in words:
            pids.append(int(proc.name))
    return pids


def server_port(pid: int) -> int:
    """The port an embedded server was told to serve on (serve DB ARTIFACTS PORT OWNER_PID)."""
    return int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-3])


def in_session(sid: int) -> list[int]:
    """The processes of the session `sid` (a process started with start_new_session, and what it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def answers(port: int) -> bool:
    """Whether anything accepts a connection on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def logged_steps(db: Path, key: str) -> list[tuple[int, int]]:
    """(step, how many points) of one metric in the SQLite store, read directly."""
    return [(step, count) for k, step, count in stored_points(db) if k == key]


def stored_points(db: Path) -> list[tuple[str, int, int]]:
    """(metric, step, how many points) of every metric in the SQLite store, read directly."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        try:
            rows = con.execute("SELECT key, step, COUNT(*) FROM metrics GROUP BY key, step ORDER BY key, step")
            return [tuple(r) for r in rows]
        except sqlite3.OperationalError:  # the tables are not there yet
            return []


def run_statuses(db: Path, sweep: str) -> dict[str, list[str]]:
    """The status of each run of a sweep in the SQLite store, by role: {"sweep": [...], "trial": [...]}."""
    statuses: dict[str, list[str]] = {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        rows = con.execute(
            "SELECT role.value, runs.status FROM runs "
            "JOIN tags AS role ON role.run_uuid = runs.run_uuid AND role.key = ? "
            "JOIN tags AS sweep ON sweep.run_uuid = runs.run_uuid AND sweep.key = ? AND sweep.value = ?",
            (schema.ROLE, schema.SWEEP, sweep),
        )
        for role, status in rows:
            statuses.setdefault(role, []).append(status)
    return statuses


def spilled_points(path: str) -> set[tuple[str, int]]:
    """(metric, step) of every point in a trial's unsent-metrics file, read as its next logger would."""
    return {(m.key, m.step) for m in SpillFile(path).read(0, 1_000_000)[0]}


OUTAGE = [
    "name=faults-mlflow",
    "grid.presets=[DiT-d2w64/8]",
    "train.steps=12",
    "train.log_every_steps=3",
    "train.ckpt_every_steps=6",  # the first log after the hold at 3 is a checkpoint: its barrier spills
    "train.milestone_steps=[12]",
    "train.val_every_steps=6",
]


def test_the_mlflow_server_killed_mid_sweep_comes_back_and_no_point_is_lost(smoke_workdir, tmp_path, ray_tmp):
    """`ditscale sweep` with its own embedded server. Rank 0 is held after step 3 until that step's points are
    stored; the sweep process (whose supervisor would start the server again) is stopped, and the server SIGKILLed:
    nothing serves its port. Released, the trial logs step 6 into the outage: its send fails, and the checkpoint
    barrier at step 6 spills those points. The sweep process goes on, its supervisor starts the server again on the
    same port, and every point of every step is stored exactly once."""
    workdir = tmp_path / "work"
    overrides = [
        *OUTAGE,
        f"data.shards={smoke_workdir}/shards/smoke",
        f"data.val_shards={smoke_workdir}/shards/smoke-val",
    ]
    experiment = load_experiment("smoke", overrides)
    plan = plan_sweep(experiment, str(workdir))
    (trial,) = plan.trials
    spill, db, hold = plan.layout(trial).unsent_metrics, workdir / "mlflow.db", TrialHold(tmp_path, 3)
    env = own_study_env(
        ray_tmp,
        **hold.env(),
        # MLflow's client retries a refused connection by itself for minutes (7 times, doubling); without that, the
        # first send into the outage fails at once, and the retries under test are the MetricLogger's own
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        DITSCALE_RAY_LOGS="1",  # the worker's warnings reach the sweep's stderr
        RAY_DEDUP_LOGS="0",
    )
    proc = start_ditscale("sweep", workdir, overrides, env, tmp_path / "logs")
    try:
        held = lambda: hold.reached() and logged_steps(db, schema.LOSS) == [(3, 1)]  # noqa: E731
        wait_for(held, "rank 0 held after step 3, its points stored", proc, watch=workdir)
        (first,) = server_pids(db)
        port = server_port(first)
        os.kill(proc.pid, signal.SIGSTOP)  # the sweep process alone (its trial trains in Ray's workers)
        try:
            wait_for(lambda: process_state(proc.pid) == "T", "the sweep process to stop", stall_s=60)
            os.kill(first, signal.SIGKILL)
            gone = lambda: process_state(first) in ("Z", None) and not answers(port)  # noqa: E731
            wait_for(gone, "the server to die and its port to refuse connections", stall_s=60)
            assert server_pids(db) == []
            hold.release()
            step_6 = {(schema.LOSS, 6), (schema.VAL_LOSS, 6)}
            outage = lambda: spilled_points(spill) >= step_6  # noqa: E731
            wait_for(outage, "the points of step 6 spilled at its checkpoint", proc, watch=workdir)
            # (the trial may go on to spill steps 9 and 12 too: only the sweep process is stopped)
            assert min(step for _, step in spilled_points(spill)) == 6 and logged_steps(db, schema.LOSS) == [(3, 1)]
            assert not answers(port) and server_pids(db) == []  # the outage lasted until then
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=900)  # (a guard against a hang, not a speed requirement)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "logs" / "err.txt").read_text()
    assert proc.returncode == 0, err[-5000:]
    # the send failed (the warning carries the error), and the supervisor started another server
    failed = re.search(rf"metric points not taken yet \((.+)\) are kept in {re.escape(spill)}", err)
    assert failed and "failed with exception" in failed.group(1), err[-5000:]
    assert f"the embedded server (pid {first}) exited with code -9" in err
    (second,) = re.findall(r"serving again \(pid (\d+)\)", err)
    assert int(second) != first and server_pids(db) == []  # and it went with the sweep

    # Every point, once: the steps logged into the outage were kept and arrived.
    points = stored_points(db)
    assert points and all(count == 1 for _, _, count in points), points
    steps = {}
    for key, step, _ in points:
        steps.setdefault(key, []).append(step)
    for key in (schema.LOSS, schema.MSE, schema.GRAD_NORM, schema.LR, schema.IMG_PER_S, schema.IMAGES_SEEN):
        assert steps[key] == [3, 6, 9, 12], key
    assert steps[schema.VAL_LOSS] == steps[schema.VAL_LOSS_EMA] == [6, 12]
    assert all(s in ([3, 6, 9, 12], [6, 12]) for s in steps.values()), steps
    assert not Path(spill).exists()  # nothing left behind


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C on `ditscale run`: its embedded server and its scoring thread
# ---------------------------------------------------------------------------------------------------------------

RUN_INTERRUPTED = [
    "name=faults-run-sigint",
    "grid.presets=[DiT-d2w64/8]",
    "train.steps=10",
    "train.log_every_steps=5",
    "train.ckpt_every_steps=5",
    "train.milestone_steps=[5, 10]",
    "train.val_every_steps=5",
    "fid.schedule=spare",  # a thread scores each milestone as it lands, on a sampling actor beside the trial
    "fid.workers=1",
    "fid.cpus_per_worker=0.5",
    "fid.gpus_per_worker=0",
    *FAST_FID,
]


def test_ctrl_c_stops_ditscale_run_with_its_server_and_scoring_thread(
    smoke_workdir, tmp_path, ray_tmp, monkeypatch, capsys
):
    """`ditscale run` with its own embedded server and fid.schedule=spare, one trial. Ctrl-C (SIGINT to the process
    group) while rank 0 is held after step 5 and the scoring thread has scored that step's milestone: the command
    says to run it again and exits 130, its processes end, its server with them, the lock is released, and the
    trial's run and the sweep's run are KILLED. The same command again finishes the study."""
    workdir = tmp_path / "work"
    shards = [f"data.shards={smoke_workdir}/shards/smoke", f"data.val_shards={smoke_workdir}/shards/smoke-val"]
    overrides = [*RUN_INTERRUPTED, *shards]
    experiment = load_experiment("smoke", overrides)
    plan = plan_sweep(experiment, str(workdir))
    (trial,) = plan.trials
    db, hold = workdir / "mlflow.db", TrialHold(tmp_path, 5)
    proc = start_ditscale("run", workdir, overrides, own_study_env(ray_tmp, **hold.env()), tmp_path / "stopped")
    try:
        scored = lambda: hold.reached() and logged_steps(db, schema.FID) == [(5, 1)]  # noqa: E731
        wait_for(scored, "rank 0 held after step 5, and that milestone scored", proc, watch=workdir)
        (server,) = server_pids(db)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: a terminal signals the whole foreground process group
        proc.wait(timeout=900)  # (a guard against a hang, not a speed requirement)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "stopped" / "err.txt").read_text()
    assert proc.returncode == 130, err[-5000:]
    assert "ditscale run: sweep faults-run-sigint interrupted" in err and "run the same command again" in err
    # every process it started ends: Ray's, its actors (each in a process group of its own, in its session) included,
    # and its server (in a session of its own): no orphan holds the store
    wait_for(lambda: not in_session(proc.pid), "the run's processes to end", stall_s=120)
    assert process_state(server) is None and server_pids(db) == []
    assert not Path(plan.workspace.lock(experiment.name)).exists()
    assert plan.state(trial).state is State.STOPPED
    assert run_statuses(db, experiment.name) == {schema.ROLE_SWEEP: ["KILLED"], schema.ROLE_TRIAL: ["KILLED"]}

    # The same command again (run_all, what it calls, in this process, whose Ray is up): the trial resumes from step
    # 5, the milestone scored before the stop is not scored again, and the study ends.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the study's own server over its store, as before
    summary = run_all(experiment, str(workdir))
    assert "0 done, 1 to resume, 0 new" in capsys.readouterr().out
    assert not summary["failed_trials"] and "fid_errors" not in summary
    assert plan.layout(trial).done_step() == 10 and plan.layout(trial).worker(0)["start_step"] == 5
    assert logged_steps(db, schema.FID) == [(5, 1), (10, 1)]
    assert run_statuses(db, experiment.name) == {schema.ROLE_SWEEP: ["FINISHED"], schema.ROLE_TRIAL: ["FINISHED"]}


# ---------------------------------------------------------------------------------------------------------------
# A worker node lost mid-trial
# ---------------------------------------------------------------------------------------------------------------

NODE_LOSS_SCRIPT = r"""
import json, os, sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from pipeline import tracking
from pipeline.experiment_files import load_experiment
from pipeline.plan import plan_sweep
from pipeline.sweep import run_sweep

workdir = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no training worker
nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
experiment = load_experiment("smoke", ["name=faults-node", "grid.presets=[DiT-d2w64/4]", "train.steps=60",
    "train.ckpt_every_steps=20", "train.log_every_steps=5", "train.milestone_steps=[60]", "train.val_every_steps=60",
    "resources.workers_per_trial=2", "resources.max_concurrent_trials=1"])
layout = plan_sweep(experiment, workdir).layout(plan_sweep(experiment, workdir).trials[0])
lost = {}

def remove_a_workers_node():
    snapshot = Path(layout.root) / "checkpoint_manager_snapshot.json"
    while not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):  # its first checkpoint is in storage
        time.sleep(0.05)
    lost.update(before=[layout.worker(r) for r in range(2)])
    node_id = layout.worker(1)["node_id"]
    cluster.remove_node(next(n for n in nodes if n.node_id == node_id), allow_graceful=False)
    lost["node"] = node_id

threading.Thread(target=remove_a_workers_node, daemon=True).start()
(outcome,) = run_sweep(experiment, workdir)
uri = os.environ["MLFLOW_TRACKING_URI"]
series = {k: tracking.metric_history(uri, outcome.mlflow_run_id, k) for k in ("loss", "loss_rank0", "loss_rank1")}
print("RESULT " + json.dumps({"status": outcome.status, "step": outcome.step, "lost": lost, "done": layout.done_step(),
    "after": [layout.worker(r) for r in range(2)], "nodes": [n.node_id for n in nodes], "series": series}))
ray.shutdown()
cluster.shutdown()
"""


def test_a_lost_node_moves_the_trial_to_the_nodes_left_from_its_checkpoint(smoke_workdir, mlflow_uri):
    """Three 1-CPU nodes, a trial of two DDP workers (one per node); the node of rank 1 is removed after the first
    checkpoint. The trial restarts on the two nodes left, from that checkpoint, and finishes its steps."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", NODE_LOSS_SCRIPT, smoke_workdir],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a guard against a hang, not a speed requirement
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert "node" in result["lost"], "the node was never removed"
    before, after = result["lost"]["before"], result["after"]
    assert len({w["node_id"] for w in before}) == 2  # one worker per node
    assert result["status"] == "done" and result["step"] == result["done"] == 60
    assert {w["node_id"] for w in after} <= set(result["nodes"]) - {result["lost"]["node"]}  # the nodes left
    assert len({w["node_id"] for w in after}) == 2 and all(w["start_step"] >= 20 for w in after)  # from a checkpoint
    loss, r0, r1 = (result["series"][k] for k in ("loss", "loss_rank0", "loss_rank1"))
    assert sorted({s for s, _ in loss}) == list(range(5, 61, 5))
    once = {s for s, _ in loss if sum(t == s for t, _ in loss) == 1}  # steps logged once (not redone after the loss)
    for (step, mean), (_, a), (_, b) in zip(loss, r0, r1):
        if step in once:
            assert mean == pytest.approx((a + b) / 2, rel=1e-6)  # the mean over ranks, not divided by the world size
    # the ranks read different parts of the data (their noise differs anyway: that alone would not show it)
    assert sorted((w["data_rank"], w["data_world"]) for w in before) == [(0, 2), (1, 2)]
    assert any(a != pytest.approx(b) for (_, a), (_, b) in zip(r0, r1))
