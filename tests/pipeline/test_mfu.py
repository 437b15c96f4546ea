"""A trial's GPU paths on CPUs. MFU per device: a real 2-worker DDP trial (gloo) logs the trial's FLOPs over two
devices' peaks; the peak comes from train.peak_tflops or the GPU's name, and an unlisted GPU logs no MFU and says which
field to set. The GPU recipe (bf16 autocast, torch.compile, gradient checkpointing) over every block option trains as
fp32 does, within bf16's tolerance."""

import pytest
import torch

from pipeline import tracking
from pipeline.experiment_files import load_experiment
from pipeline.layout import Workspace
from pipeline.plan import plan_sweep
from pipeline.sweep import run_sweep
from pipeline.worker_metrics import mfu_peak_flops

PEAK_TFLOPS = 0.05  # of one CPU worker: small enough that the MFU is not rounded away, large enough to stay below 1
STEPS = 20


@pytest.fixture(scope="module")
def gpu_recipe_sweep(smoke_workdir, mlflow_uri):
    """One sweep of two 2-worker DDP trials (gloo) of the same model, data and seed, with every block option (RoPE,
    SwiGLU, RMSNorm, QK-norm), gradient checkpointing and the paper's hybrid loss: variant `gpu` trains as a GPU
    does (bf16 autocast, torch.compile of the model and the loss), variant `ref` in fp32, eager. Losses are logged
    at every step. Returns {variant: (trial, outcome)}."""
    experiment = load_experiment(
        "smoke",
        [
            "name=smoke-gpu-recipe",
            "grid.presets=[DiT-d2w64/4]",
            f"train.steps={STEPS}",
            "train.log_every_steps=1",
            f"train.ckpt_every_steps={STEPS}",
            f"train.milestone_steps=[{STEPS}]",
            f"train.val_every_steps={STEPS}",
            "resources.workers_per_trial=2",
            "resources.max_concurrent_trials=1",
            f"train.peak_tflops={PEAK_TFLOPS}",
            "model.positions=rope",
            "model.mlp=swiglu",
            "model.norm=rmsnorm",
            "model.qk_norm=true",
            "model.grad_checkpointing=true",
            'grid.variants={"gpu": {"train.precision": "bf16", "train.compile": true}, '
            '"ref": {"train.precision": "fp32", "train.compile": false}}',
        ],
    )
    trials = {t.variant: t for t in plan_sweep(experiment, smoke_workdir).trials}
    outcomes = {o.trial.variant: o for o in run_sweep(experiment, smoke_workdir)}
    assert all(o.status == "done" for o in outcomes.values()), outcomes
    return {v: (trials[v], outcomes[v]) for v in ("gpu", "ref")}


def test_each_worker_gets_its_own_rank_and_data(gpu_recipe_sweep, smoke_workdir):
    """The rank wiring: two worker processes, ranks 0 and 1 of a world of 2, each reading its own part of the data."""
    trial, _ = gpu_recipe_sweep["gpu"]
    layout = Workspace(smoke_workdir).trial("smoke-gpu-recipe", trial.run_name)
    records = [layout.worker(rank) for rank in (0, 1)]
    assert [(r["rank"], r["world"]) for r in records] == [(0, 2), (1, 2)]
    assert [(r["data_rank"], r["data_world"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["pid"] != records[1]["pid"]


def test_a_two_worker_trial_logs_mfu_per_device(gpu_recipe_sweep, mlflow_uri):
    trial, outcome = gpu_recipe_sweep["gpu"]
    mfu = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "mfu")
    img_per_s = dict(tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "img_per_s"))
    assert [step for step, _ in mfu] == list(range(1, STEPS + 1))
    flops_per_image = 6 * trial.gflops * 1e9  # training FLOPs: forward + backward, 2 FLOPs per multiply-add
    for step, value in mfu:
        # img_per_s is the whole trial's (global batch / s), shared by 2 workers, each with PEAK_TFLOPS
        assert value == pytest.approx(flops_per_image * img_per_s[step] / (2 * PEAK_TFLOPS * 1e12), rel=1e-9)
        assert 0 < value <= 1


# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.39%). Measured on the 2-core machine (2026-12-07): the worst
# relative difference of the per-step loss (mean over the 2 ranks) over the 20 steps was 0.020%, of the EMA's
# validation loss at the end 0.012%; the bound, bf16's unit roundoff, leaves about 20x.
LOSS_TOLERANCE = 2**-8


def test_bf16_and_compile_train_like_fp32_over_every_block_option(gpu_recipe_sweep, mlflow_uri):
    """The GPU recipe (bf16 autocast + torch.compile + gradient checkpointing, with RoPE, SwiGLU, RMSNorm and QK-norm)
    on a 2-worker trial stays finite and follows the fp32 eager trial of the same seed, step by step, EMA included
    (the validation loss of the EMA weights at the end)."""
    losses, val_ema = {}, {}
    for variant, (_, outcome) in gpu_recipe_sweep.items():
        losses[variant] = dict(tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "loss"))
        val_ema[variant] = dict(tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "val_loss_ema"))[STEPS]
    assert sorted(losses["gpu"]) == sorted(losses["ref"]) == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in losses.values())
    worst = max(abs(losses["gpu"][s] - losses["ref"][s]) / abs(losses["ref"][s]) for s in losses["ref"])
    assert worst < LOSS_TOLERANCE, f"worst relative loss difference {worst:.4f}"
    assert abs(val_ema["gpu"] - val_ema["ref"]) / val_ema["ref"] < LOSS_TOLERANCE, val_ema
    assert losses["gpu"][STEPS] < losses["gpu"][1]  # and it learns


def test_the_peak_is_the_configured_one_or_the_gpus_datasheet_figure(monkeypatch, capsys):
    assert mfu_peak_flops(400.0, torch.device("cuda")) == 400e12  # train.peak_tflops wins, on a GPU too
    assert mfu_peak_flops(0.5, torch.device("cpu")) == 0.5e12
    assert mfu_peak_flops(0.0, torch.device("cpu")) is None  # no MFU on CPUs unless told the peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert mfu_peak_flops(0.0, torch.device("cuda")) == 989.5e12  # an H100 SXM: not an H200's measured 790
    assert capsys.readouterr().out == ""


def test_an_unlisted_gpu_logs_no_mfu_and_names_the_field(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    assert mfu_peak_flops(0.0, torch.device("cuda")) is None
    out = capsys.readouterr().out
    assert "WARNING" in out and "'NVIDIA A10G'" in out and "train.peak_tflops" in out
    assert mfu_peak_flops(0.0, torch.device("cuda"), warn=False) is None  # ranks other than 0 stay quiet
    assert capsys.readouterr().out == ""
