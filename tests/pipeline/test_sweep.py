"""The sweep on a real local Ray (Tune x Train V2) and a real MLflow server: results, resume, faults, scale-out."""

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import ConfigError
from pipeline.experiment_files import load_experiment
from pipeline.plan import plan_sweep
from pipeline.sweep import check_cluster, max_concurrent, run_sweep
from pipeline.trial_state import State
from tests.helpers import registered_checkpoint, trial_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(smoke_sweep):
    return smoke_sweep


def test_smoke_sweep_runs_every_trial_to_the_end(smoke, smoke_workdir, mlflow_uri):
    experiment, outcomes = smoke
    assert [o.status for o in outcomes] == ["done"] * 4
    assert {o.trial.preset for o in outcomes} == {"DiT-d2w64/4", "DiT-d2w64/8", "DiT-d4w128/4", "DiT-d4w128/8"}
    plan = plan_sweep(experiment, smoke_workdir)
    for o in outcomes:
        layout = plan.layout(o.trial)
        assert layout.done_step() == 30 and plan.state(o.trial).state is State.DONE
        milestones = layout.milestones()
        assert sorted(milestones) == [15, 30] and all(Path(p).is_file() for p in milestones.values())
        assert Path(milestones[30]).name == "ema-0000030.pt"
        assert len(glob.glob(f"{layout.root}/checkpoint_*/checkpoint.pt")) == experiment.train.keep_checkpoints


def test_the_largest_trials_start_first(smoke, smoke_workdir):
    """Two slots and four trials listed smallest-first-ish in the grid (d2w64/4, d2w64/8, d4w128/4, d4w128/8): the two
    with the most training compute take the slots; each of the others starts only after one of them has finished."""
    experiment, outcomes = smoke
    plan = plan_sweep(experiment, smoke_workdir)
    by_compute = sorted(plan.trials, key=lambda t: -t.training_compute["flops"])
    assert [t.preset for t in plan.trials] != [t.preset for t in by_compute]  # the grid's own order is another
    started = {t.run_name: plan.layout(t).worker(0)["started_unix_s"] for t in plan.trials}
    finished = {t.run_name: plan.layout(t).done_record()["finished_unix_s"] for t in plan.trials}
    first_end = min(finished[t.run_name] for t in by_compute[:2])
    assert all(started[t.run_name] > first_end for t in by_compute[2:])


def test_mlflow_has_one_parent_and_a_child_per_trial(smoke, mlflow_uri):
    experiment, outcomes = smoke
    client = tracking.client(mlflow_uri)
    exp_id = tracking.experiment_id(mlflow_uri, experiment.mlflow_experiment)
    parents = client.search_runs([exp_id], "tags.`ditscale.role` = 'sweep' and tags.`ditscale.sweep` = 'smoke'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["git_commit"] and parents[0].data.tags["manifest_hash"]
    children = trial_runs(mlflow_uri, "smoke")
    assert len(children) == 4
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        p = child.data.params
        assert p["train.lr"] == "0.001" and p["model.hidden_size"] in ("64", "128") and p["preset"].startswith("DiT-")
        assert float(p["gflops"]) > 0 and int(p["params"]) > 0 and "eps" in p["objective"]
        metrics = child.data.metrics
        for key in (
            "loss",
            "mse",
            "vb",
            "grad_norm",
            "lr",
            "img_per_s",
            "step_time_s",
            "peak_memory_gib",
            "val_loss",
            "val_loss_ema",
        ):
            assert key in metrics, key
        history = tracking.metric_history(mlflow_uri, child.info.run_id, "loss")
        assert [s for s, _ in history] == [5, 10, 15, 20, 25, 30]
        assert history[-1][1] < history[0][1]  # loss goes down
        assert [s for s, _ in tracking.metric_history(mlflow_uri, child.info.run_id, "val_loss")] == [15, 30]


def test_rerunning_a_finished_sweep_trains_nothing(smoke, smoke_workdir, monkeypatch):
    experiment, _ = smoke
    import ray.tune

    def no_tuner(*args, **kwargs):
        raise AssertionError("a finished sweep must not start Tune")

    monkeypatch.setattr(ray.tune, "Tuner", no_tuner)
    plan = plan_sweep(experiment, smoke_workdir)
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{plan.storage}/*/checkpoint_*/checkpoint.pt")}
    outcomes = run_sweep(experiment, smoke_workdir)
    assert [o.status for o in outcomes] == ["done"] * 4
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{plan.storage}/*/checkpoint_*/checkpoint.pt")} == before


def test_killed_worker_is_replaced_and_the_trial_finishes(smoke_workdir, mlflow_uri):
    """SIGKILL the Ray Train worker after its first checkpoint: Train restarts it from that checkpoint."""
    experiment = load_experiment(
        "smoke",
        [
            "name=smoke-kill",
            "grid.presets=[DiT-d4w128/4]",
            "train.steps=80",
            "train.ckpt_every_steps=20",
            "train.log_every_steps=10",
            "train.milestone_steps=[80]",
            "train.global_batch_size=32",
        ],
    )
    layout = plan_sweep(experiment, smoke_workdir).layout(plan_sweep(experiment, smoke_workdir).trials[0])
    trial_dir = Path(layout.root)
    killed, swept = {}, threading.Event()

    def killer():  # waits for the first checkpoint as long as the sweep runs (no deadline)
        while not swept.is_set():
            info = Path(layout.worker_file(0))
            if info.exists() and registered_checkpoint(trial_dir):
                pid = json.loads(info.read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    outcomes = run_sweep(experiment, smoke_workdir)
    swept.set()
    thread.join()
    assert "pid" in killed, "the worker was never killed"
    assert outcomes[0].status == "done" and outcomes[0].step == 80
    restarted = layout.worker(0)
    assert restarted["pid"] != killed["pid"] and restarted["start_step"] >= 20  # resumed from a checkpoint
    history = tracking.metric_history(mlflow_uri, outcomes[0].mlflow_run_id, "loss")
    assert history[-1][0] == 80
    redone = len(history) - 80 // 10
    assert 0 <= redone <= 20 // 10, f"{redone} logging windows ran twice; at most one checkpoint interval may"


def test_trials_leave_room_for_what_runs_beside_them(ray_session):
    """The FID sampling actors of `ditscale run` hold resources of their own; the sweep fits its trials around them
    and refuses, with the fix, when not even one trial fits."""
    e = load_experiment("smoke", ["resources.cpus_per_worker=0.75", "resources.max_concurrent_trials=0"])
    assert ray_session.cluster_resources()["CPU"] == 2
    assert max_concurrent(e) == 2 and max_concurrent(e, {"CPU": 0.5}) == 2 and max_concurrent(e, {"CPU": 1.0}) == 1
    check_cluster(e, {"CPU": 1.25})
    with pytest.raises(
        ConfigError, match=r"has 0.5 free beside the 1.5 CPU held for FID sampling.*fid.schedule=between or after"
    ):
        check_cluster(e, {"CPU": 1.5})
