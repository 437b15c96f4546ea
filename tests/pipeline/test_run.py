"""`ditscale run`: the quickstart's code path end to end (toy data, prepare, sweep, fid, analyze), scaled down."""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.experiment_files import load_experiment
from pipeline.fid.study import ScoringWhileTraining
from pipeline.layout import Workspace
from pipeline.plan import plan_sweep
from pipeline.run import run_all
from tests.helpers import FAST_FID, trial_runs, wait_for

MINI = [
    "name=quickstart-mini",
    "data.shards=shards/qs-mini",
    "data.val_shards=shards/qs-mini-val",
    "data.toy.num_classes=4",
    "data.toy.per_class=40",
    "data.toy_val_per_class=4",
    "data.prepare.samples_per_shard=80",
    "train.global_batch_size=16",
    "train.steps=20",
    "train.milestone_steps=[10, 20]",
    "train.ckpt_every_steps=10",
    "train.log_every_steps=5",
    "train.val_every_steps=10",
    "fid.num_samples=150",
    "fid.classifier_steps=50",
    "fid.slice_size=75",
    "fid.batch_size=75",
]


def test_run_chains_every_stage_and_resumes(ray_session, mlflow_uri, tmp_path, capsys):
    experiment = load_experiment("quickstart", MINI)
    workdir = str(tmp_path / "work")
    summary = run_all(experiment, workdir)
    out = capsys.readouterr().out
    assert "error" not in summary and summary["step"] == 20 and summary["presets"] == 4
    assert "figures and tables" in out and "checkpoints" in out and "MLflow" in out
    analysis = Path(workdir) / "analysis" / "quickstart-mini"
    assert (analysis / "fid_vs_gflops.png").exists() and (analysis / "table4.md").exists()
    assert f"{analysis}/report.html" in out and "Held-out prediction" in (analysis / "report.html").read_text()
    assert json.loads((analysis / "summary.json").read_text())["fid_vs_gflops"]["n"] == 4
    for run in trial_runs(mlflow_uri, "quickstart-mini"):
        assert [s for s, _ in tracking.metric_history(mlflow_uri, run.info.run_id, "fid")] == [10, 20]
    # the timeline: phases in order, and the tail after the last trial measured against the whole run
    t = summary["timeline"]
    assert 0 < t["data_s"] <= t["last_trial_end_s"] <= t["sweep_s"] <= t["fid_s"] <= t["analysis_s"] <= t["end_s"]
    assert t["tail_s"] == pytest.approx(t["end_s"] - t["last_trial_end_s"], abs=0.2) and 0 < t["tail_share"] < 1
    assert f"({t['tail_share']:.0%} of the run) before the end" in out
    # Everything is done: a second run trains and scores nothing and gives the same analysis.
    again = run_all(experiment, workdir)
    out = capsys.readouterr().out
    assert "4 done, 0 to resume, 0 new" in out and "nothing new to score" in out
    assert again["fid_vs_gflops"]["b"] == summary["fid_vs_gflops"]["b"]
    assert "tail_s" not in again["timeline"] and "no trial trained in this run" in out


def test_milestones_are_scored_as_they_land(smoke_sweep, smoke_workdir, mlflow_uri):
    """`ditscale run`'s fid stage beside training: a milestone that appears in a trial's folder is scored into MLflow
    while the watcher still runs, on an actor that holds its own share of a CPU."""
    experiment = load_experiment("smoke", [*FAST_FID, "name=smoke-watch", "fid.workers=1", "fid.cpus_per_worker=0.5"])
    swept = Workspace(smoke_workdir)
    plan = plan_sweep(experiment, smoke_workdir)
    exp_id = tracking.experiment_id(mlflow_uri, experiment.mlflow_experiment)
    parent = tracking.sweep_run(mlflow_uri, exp_id, experiment.name, {}, {})
    trial = plan.trials[0]
    run_id = tracking.trial_run(mlflow_uri, exp_id, parent, experiment.name, trial.run_name, {}, {})
    source = swept.trial("smoke", trial.run_name).milestones()  # the smoke sweep's EMA weights of this trial

    def land(step):  # as the training loop writes a milestone: under a temporary name, then renamed
        target = Path(plan.layout(trial).milestone(step))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source[step], target.with_name(f".{target.name}.tmp"))
        os.replace(target.with_name(f".{target.name}.tmp"), target)

    def scored():
        return [s for s, _ in tracking.metric_history(mlflow_uri, run_id, "fid")]

    with ScoringWhileTraining(experiment, smoke_workdir, mlflow_uri, poll_s=0.2) as scoring:
        assert scoring.reserved == {"CPU": 0.5, "GPU": 0}
        land(15)
        wait_for(lambda: scored() == [15], "the score of the first milestone", failed=lambda: scoring.error)
        assert scoring.thread.is_alive()  # scored by the watcher, before training is declared over
        land(30)
        wait_for(lambda: scored() == [15, 30], "the score of the second milestone", failed=lambda: scoring.error)
        records = scoring.finish()
    assert [(r["run_name"], r["step"]) for r in records] == [(trial.run_name, 15), (trial.run_name, 30)]
    assert all(r["fid"] > 0 for r in records)


def test_each_trial_scores_its_milestones_in_its_own_slot(smoke_workdir, mlflow_uri):
    """fid.schedule=between: the sweep itself (no fid pass after it, no watcher) leaves the trial's milestones scored,
    by actors started in the trial's slot once it had trained, with the precision facts on the run; a second run
    scored with another sampling precision is refused, naming what differs."""
    from pipeline.config import ConfigError
    from pipeline.fid.study import run_fid, score_trial
    from pipeline.sweep import run_sweep

    overrides = [*FAST_FID, "name=smoke-between", "grid.presets=[DiT-d2w64/8]", "fid.schedule=between"]
    experiment = load_experiment("smoke", overrides)
    (outcome,) = run_sweep(experiment, smoke_workdir, after_training=score_trial)
    assert outcome.status == "done"
    history = tracking.client(mlflow_uri).get_metric_history(outcome.mlflow_run_id, "fid")
    assert sorted(m.step for m in history) == [15, 30] and all(m.value > 0 for m in history)
    finished = Workspace(smoke_workdir).trial("smoke-between", outcome.trial.run_name).done_record()["finished_unix_s"]
    assert all(m.timestamp / 1000 >= finished - 1 for m in history)  # scored after the trial had trained
    tags = tracking.client(mlflow_uri).get_run(outcome.mlflow_run_id).data.tags
    assert (tags["fid.precision"], tags["fid.decode_dtype"], tags["fid.device"]) == ("fp32", "fp32", "cpu")
    assert (tags["fid.train_precision"], tags["fid.train_compile"]) == ("fp32", "false")
    # more milestones, scored at another precision: refused before anything is logged
    bf16 = load_experiment("smoke", [*overrides, "fid.precision=bf16"])
    with pytest.raises(ConfigError, match=r"fid.precision=fp32 before, bf16 now"):
        run_fid(replace_milestones(bf16, smoke_workdir, outcome), smoke_workdir, progress=False)


def replace_milestones(experiment, workdir, outcome):
    """The experiment, with one more milestone of the trial on disk (a copy of step 30 as step 20) to score."""
    layout = Workspace(workdir).trial(experiment.name, outcome.trial.run_name)
    shutil.copy(layout.milestone(30), layout.milestone(20))
    return experiment
