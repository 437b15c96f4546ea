"""`ditscale run`: the quickstart's code path end to end (toy data, prepare, sweep, fid, analyze), scaled down."""

import json
from pathlib import Path

from pipeline import tracking
from pipeline.experiment_files import load_experiment
from pipeline.run import run_all
from tests.helpers import trial_runs

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
    # Everything is done: a second run trains and scores nothing and gives the same analysis.
    again = run_all(experiment, workdir)
    out = capsys.readouterr().out
    assert "4 done, 0 to resume, 0 new" in out and "nothing new to score" in out
    assert again["fid_vs_gflops"]["b"] == summary["fid_vs_gflops"]["b"]
