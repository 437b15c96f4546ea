"""A study with replicates and several EMAs end to end on real Ray and MLflow: every grid point trained once per
seed, two EMAs kept, saved and scored, and the analysis pooling the seeds, reading each model at its best EMA and
writing one self-contained report to the sweep's run."""

import base64
import re

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.analyze import analyze_experiment
from pipeline.layout import Workspace
from tests.helpers import FAST_FID, sweep_and_score

PRESETS = ("DiT-d2w64/8", "DiT-d2w64/4", "DiT-d4w128/8", "DiT-d4w128/4")  # the smoke grid, by Gflops
STUDY = [
    "name=smoke_replicates",
    "grid.seeds=[0, 1]",
    "train.ema_decays=[0.99]",
    *FAST_FID,
]


@pytest.fixture(scope="module")
def study(smoke_workdir, mlflow_uri):
    return sweep_and_score(STUDY, smoke_workdir)


def test_every_point_trains_once_per_seed_with_both_emas_saved_and_scored(study, smoke_workdir, mlflow_uri):
    experiment, outcomes = study
    assert [o.status for o in outcomes] == ["done"] * 8
    assert sorted((o.trial.preset, o.trial.seed) for o in outcomes) == sorted((p, s) for p in PRESETS for s in (0, 1))
    first_losses = {}
    for outcome in outcomes:
        layout = Workspace(smoke_workdir).trial(experiment.name, outcome.trial.run_name)
        assert sorted(layout.milestones()) == sorted(layout.milestones(0.99)) == [15, 30]
        main = torch.load(layout.milestones()[30], weights_only=True)
        slow = torch.load(layout.milestones(0.99)[30], weights_only=True)
        assert (main["ema_decay"], slow["ema_decay"]) == (0.9, 0.99)
        assert any(not torch.equal(main["model"][k], slow["model"][k]) for k in main["model"])
        run = tracking.client(mlflow_uri).get_run(outcome.mlflow_run_id)
        assert run.data.params["seed"] == str(outcome.trial.seed)
        for key in ("fid", "ema0.99/fid", "ema0.99/class_accuracy"):
            assert [s for s, _ in tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, key)] == [15, 30], key
        first_losses[(outcome.trial.preset, outcome.trial.seed)] = tracking.metric_history(
            mlflow_uri, outcome.mlflow_run_id, "loss"
        )[0][1]
    # seeds differ in what they train: the same model's first logged loss is not the same twice
    assert all(first_losses[(p, 0)] != first_losses[(p, 1)] for p, _ in first_losses)


def test_analysis_pools_the_seeds_picks_the_best_ema_and_writes_one_report(study, smoke_workdir, mlflow_uri, tmp_path):
    experiment, outcomes = study
    summary = analyze_experiment(experiment, smoke_workdir, out=str(tmp_path))
    assert summary["replicates"]["seeds"] == [0, 1] and summary["presets"] == 4
    # each model's EMA is the one with the lowest mean FID over its seeds at the chosen step, checked against MLflow
    best = {}
    for preset in PRESETS:
        runs = [o.mlflow_run_id for o in outcomes if o.trial.preset == preset]
        means = {
            decay: np.mean([dict(tracking.metric_history(mlflow_uri, r, key))[30] for r in runs])
            for decay, key in ((0.9, "fid"), (0.99, "ema0.99/fid"))
        }
        assert summary["ema"]["chosen"][preset] == min(means, key=means.get)
        best[preset] = min(means.values())
    fit = summary["fid_vs_gflops"]
    assert fit["n"] == 8 and "b_seed_ci" in fit and 0 < fit["seed_share"]  # both seeds of every point entered
    (prediction,) = summary["fid_held_out"]["predictions"]  # fitted on the 3 smaller models
    assert summary["fid_held_out"]["fit_on"] == 3 and prediction["label"] == "DiT-d4w128/4"
    assert prediction["measured"] == pytest.approx(best["DiT-d4w128/4"])  # the mean of its seeds at its best EMA
    lo, hi = prediction["interval"]
    assert prediction["inside"] == (lo <= prediction["measured"] <= hi)
    assert prediction["error"] == pytest.approx(prediction["predicted"] / prediction["measured"] - 1)
    assert "skipped" in summary["isoflop"]  # 2 sizes: no parabola, a message
    report = (tmp_path / "report.html").read_text()
    assert "Held-out prediction" in report and "Compute-optimal frontier" in report and "FID per EMA decay" in report
    assert not re.search(r'src="(?!data:)', report)  # self-contained: every figure inlined
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', report)
    assert len(images) >= 5 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    markdown = (tmp_path / "report.md").read_text()
    for figure in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown):
        assert (tmp_path / figure).is_file(), figure
    logged = {a.path for a in tracking.client(mlflow_uri).list_artifacts(summary["logged_to"], "analysis")}
    assert {"analysis/report.html", "analysis/report.md", "analysis/ema_decays.png"} <= logged
