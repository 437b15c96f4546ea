"""analyze from a real MLflow store written by the smoke sweep and the fid stage."""

import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from analysis.fits import FitError, fit_power_law
from analysis.loader import load_runs, model_config
from analysis.report import analyze
from analysis.summary import summarize
from pipeline import tracking
from pipeline.analyze import analyze_experiment
from pipeline.experiment_files import load_experiment
from pipeline.fid.study import run_fid
from tests.helpers import FAST_FID as FAST


@pytest.fixture(scope="module")
def scored(smoke_sweep, smoke_workdir, mlflow_uri):
    experiment, outcomes = smoke_sweep
    run_fid(load_experiment("smoke", FAST), smoke_workdir, progress=False)  # idempotent
    return experiment, outcomes


def test_loader_builds_the_tidy_frame(scored, mlflow_uri):
    experiment, outcomes = scored
    frame, curves, notes = load_runs(mlflow_uri, experiment.mlflow_experiment, sweep="smoke")
    assert len(frame) == 8  # 4 trials x milestones 15 and 30
    assert set(frame["preset"]) == {o.trial.preset for o in outcomes} and set(frame["step"]) == {15, 30}
    row = frame[(frame["preset"] == "DiT-d4w128/4") & (frame["step"] == 30)].iloc[0]
    trial = next(o.trial for o in outcomes if o.trial.preset == "DiT-d4w128/4")
    assert row["gflops"] == pytest.approx(trial.gflops) and row["params"] == trial.params
    assert row["compute_gmacs"] == pytest.approx(trial.gflops * 3 * 16 * 30)
    assert row["compute_flops"] == pytest.approx(2e9 * row["compute_gmacs"])
    assert row["fid"] > 0 and np.isfinite(row["loss"]) and row["extractor"] == "ditscale-classifier"
    assert len(curves) == 4 * 6 and notes == []


def test_analyze_writes_and_logs_everything(scored, smoke_workdir, mlflow_uri, tmp_path, capsys):
    experiment, _ = scored
    exp_id = tracking.experiment_id(mlflow_uri, experiment.mlflow_experiment)
    parent = tracking.find_run(mlflow_uri, exp_id, {tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: "smoke"})
    logged_before = tracking.client(mlflow_uri).list_artifacts(parent.info.run_id)
    alone = analyze(mlflow_uri, experiment.mlflow_experiment, str(tmp_path / "alone"), sweep="smoke")
    assert alone["metrics"]["scaling_fid_gflops_b"] == alone["fid_vs_gflops"]["b"]
    assert tracking.client(mlflow_uri).list_artifacts(parent.info.run_id) == logged_before  # the analysis only reads
    summary = analyze_experiment(experiment, smoke_workdir, out=str(tmp_path))
    assert summary["logged_to"] == parent.info.run_id and summary["out"] == str(tmp_path)
    out = capsys.readouterr().out
    assert summary["step"] == 30 and summary["presets"] == 4
    fit = summary["fid_vs_gflops"]
    assert "r = " in out and f"{fit['b']:.3f}" in out
    for name in ("fid_vs_steps", "fid_vs_gflops", "fid_vs_compute", "loss_curves"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000 and (tmp_path / f"{name}.svg").exists()
    table = pd.read_csv(tmp_path / "table4.csv")
    assert list(table["preset"]) == list(table.sort_values("gflops")["preset"]) and len(table) == 4
    assert "| preset" in (tmp_path / "table4.md").read_text()
    # what the loader read from MLflow: the table's class accuracy is the fid stage's at step 30, and the FID
    # progress splits the presets as their own first (step 15) and last (step 30) scores say
    frame, _, _ = load_runs(mlflow_uri, experiment.mlflow_experiment, sweep="smoke")
    at = frame[frame["step"] == 30]  # one seed and one EMA: the fit reads exactly these rows
    alone, _ = fit_power_law(at["gflops"], at["fid"])
    assert (fit["a"], fit["b"], fit["r2"], fit["n"]) == pytest.approx((alone.a, alone.b, alone.r2, 4))
    assert fit["b_ci"] == pytest.approx(alone.b_ci) and fit["b_ci"][0] < fit["b_ci"][1]
    fids = frame.pivot(index="preset", columns="step", values="fid")
    accuracy = frame[frame["step"] == 30].set_index("preset")["class_accuracy"]
    assert table.set_index("preset")["class_accuracy"].to_dict() == pytest.approx(accuracy.to_dict())
    progress = summary["fid_first_to_last"]
    assert "FID improved from the first" in out
    assert progress["not"] == sorted(fids.index[~(fids[30] < fids[15])])
    assert progress["improved"] == int((fids[30] < fids[15]).sum()) and sorted(progress["presets"]) == sorted(
        fids.index
    )
    assert {p: v["first_fid"] for p, v in progress["presets"].items()} == pytest.approx(fids[15].to_dict())
    assert {p: v["last_fid"] for p, v in progress["presets"].items()} == pytest.approx(fids[30].to_dict())
    assert all((v["first_step"], v["last_step"]) == (15, 30) for v in progress["presets"].values())
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))  # the fid stage's sample grids, copied
    assert grids == sorted(f"{p.replace('/', '_')}.png" for p in table["preset"])
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 30
    logged = {a.path for a in tracking.client(mlflow_uri).list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/fid_vs_gflops.png", "analysis/table4.csv", "analysis/summary.json"} <= logged
    metrics = tracking.client(mlflow_uri).get_run(parent.info.run_id).data.metrics
    assert metrics["scaling_fid_gflops_b"] == pytest.approx(fit["b"])


def test_degenerate_frames_give_messages_and_no_line():
    base = {
        "run_name": "r",
        "size": "d2w64",
        "params": 1,
        "global_batch_size": 16,
        "compute_gmacs": 1.0,
        "compute_flops": 2e9,
        "loss": 0.5,
        "val_loss": 0.5,
        "final_loss": 0.5,
    }
    two = pd.DataFrame(
        [
            {**base, "preset": p, "patch": 4, "gflops": g, "step": 10, "fid": f}
            for p, g, f in (("DiT-d2w64/4", 0.1, 50.0), ("DiT-d2w64/8", 0.05, 80.0))
        ]
    )
    summary = summarize(two, pd.DataFrame(), None)
    assert "at least 3 presets" in summary.json["fid_vs_gflops"]["skipped"] and "fid_vs_gflops" not in summary.fits
    same = pd.concat([two, two.assign(preset="DiT-d4w128/4", fid=60.0)]).assign(gflops=0.1)
    assert "same x" in summarize(same, pd.DataFrame(), None).json["fid_vs_gflops"]["skipped"]
    nan = pd.concat([two, two.iloc[:1].assign(preset="DiT-d4w128/4", gflops=0.3, fid=np.nan)])
    assert "missing" in summarize(nan, pd.DataFrame(), None).json["fid_vs_gflops"]["skipped"]
    with pytest.raises(FitError, match="no scored checkpoints"):
        summarize(two.iloc[:0], pd.DataFrame(), None)
    with pytest.raises(FitError, match="no checkpoint was scored at step 99"):
        summarize(two, pd.DataFrame(), 99)


def test_model_config_is_read_back_from_the_params_mlflow_keeps_as_strings():
    """The loader rebuilds each trial's DiTConfig from its `model.*` params for dit_core's training compute."""
    from dit_core.config import dit_config

    config = dit_config("DiT-d2w64/4", mlp="swiglu", qk_norm=True, input_size=8, in_channels=3, num_classes=10)
    params = {f"model.{k}": str(v) for k, v in asdict(config).items()}  # as mlflow.log_params stores them
    assert model_config(params, "r") == config
    with pytest.raises(ValueError, match="run r has no model.qk_norm param"):
        model_config({k: v for k, v in params.items() if k != "model.qk_norm"}, "r")
