"""A study of two designs end to end on real Ray and MLflow: the 2023 DiT and a modern one (flow matching with
logit-normal timesteps, RoPE, SwiGLU, RMSNorm, QK-norm) trained side by side, scored with their own samplers, and
analysed per variant."""

import math

import pandas as pd
import pytest

from pipeline import tracking
from pipeline.analyze import analyze_experiment
from tests.helpers import FAST_FID, sweep_and_score

STUDY = [
    "name=smoke_variants",
    "grid.sizes=[d2w64]",
    "grid.patch_sizes=[8]",  # one model per design: what is checked here is the plumbing of the variant axis
    "grid.variants={dit2023: {}, modern: {model: {positions: rope, mlp: swiglu, norm: rmsnorm, qk_norm: true}, "
    "diffusion: {objective: flow, prediction: v, learn_sigma: false, loss: mse, timestep_sampling: logit_normal}, "
    "fid: {sampler: heun}}}",
    *FAST_FID,
]


@pytest.fixture(scope="module")
def study(smoke_workdir, mlflow_uri):
    return sweep_and_score(STUDY, smoke_workdir)


def test_both_designs_train_and_record_their_variant(study, mlflow_uri):
    experiment, outcomes = study
    assert [o.status for o in outcomes] == ["done"] * 2
    by_variant = {o.trial.variant: o for o in outcomes}
    assert set(by_variant) == {"dit2023", "modern"}
    for variant, outcome in by_variant.items():
        run = tracking.client(mlflow_uri).get_run(outcome.mlflow_run_id)
        assert run.data.params["variant"] == variant and f"-{variant}-" in outcome.trial.run_name
        losses = [v for _, v in tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "loss")]
        assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
        val = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "val_loss")
        assert [s for s, _ in val] == [15, 30] and all(math.isfinite(v) for _, v in val)
    modern = tracking.client(mlflow_uri).get_run(by_variant["modern"].mlflow_run_id)
    assert modern.data.params["axis.diffusion.objective"] == "flow"
    assert modern.data.params["model.positions"] == "rope" and modern.data.params["objective"].startswith("flow")
    # the flow model's velocity loss starts near E||eps - x_0||^2 ~ 1 + Var(x_0) and falls
    flow_losses = [v for _, v in tracking.metric_history(mlflow_uri, by_variant["modern"].mlflow_run_id, "loss")]
    assert flow_losses[-1] < flow_losses[0]


def test_each_variant_is_scored_with_its_own_sampler(study, mlflow_uri):
    _, outcomes = study
    for outcome in outcomes:
        run = tracking.client(mlflow_uri).get_run(outcome.mlflow_run_id)
        wanted = "heun-10" if outcome.trial.variant == "modern" else "ddim-10"
        assert run.data.tags["fid.sampler"] == wanted
        fids = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "fid")
        assert [s for s, _ in fids] == [15, 30] and all(v > 0 for _, v in fids)


def test_the_analysis_fits_each_variant_on_its_own(study, smoke_workdir, tmp_path, capsys):
    experiment, _ = study
    summary = analyze_experiment(experiment, smoke_workdir, out=str(tmp_path))
    variants = summary["by_variant"]["variants"]
    assert set(variants) == {"dit2023", "modern"} and all(v["trials"] == 1 for v in variants.values())
    # one preset per variant cannot carry a fit with an interval: a reason, and no line
    assert all("at least 3" in v["fid_vs_gflops"]["skipped"] for v in variants.values())
    assert summary["by_variant"]["crossovers"] == []
    table = pd.read_csv(tmp_path / "variants.csv")
    assert list(table["variant"]) == ["dit2023", "modern"] and table["fid_at_largest"].gt(0).all()
    assert (tmp_path / "variants_fid_vs_gflops.png").exists() and (tmp_path / "variants_loss_vs_compute.png").exists()
    labels = set(pd.read_csv(tmp_path / "table4.csv")["label"])
    assert labels == {f"DiT-d2w64/8 {v}" for v in ("dit2023", "modern")}
    assert "variant modern (1 trial): " in capsys.readouterr().out
