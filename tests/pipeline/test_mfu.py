"""MFU per device: a real 2-worker DDP trial on CPUs (gloo) logs the trial's FLOPs over two devices' peaks; the peak
comes from train.peak_tflops or the GPU's name, and an unlisted GPU logs no MFU and says which field to set."""

import pytest
import torch

from pipeline import tracking
from pipeline.experiment_files import load_experiment
from pipeline.plan import plan_sweep
from pipeline.sweep import run_sweep
from pipeline.train import mfu_peak_flops

PEAK_TFLOPS = 0.05  # of one CPU worker: small enough that the MFU is not rounded away, large enough to stay below 1


def test_a_two_worker_trial_logs_mfu_per_device(smoke_workdir, mlflow_uri):
    experiment = load_experiment(
        "smoke",
        [
            "name=smoke-mfu",
            "grid.presets=[DiT-d2w64/4]",
            "train.steps=20",
            "train.log_every_steps=5",
            "train.ckpt_every_steps=20",
            "train.milestone_steps=[20]",
            "train.val_every_steps=20",
            "resources.workers_per_trial=2",
            "resources.max_concurrent_trials=1",
            f"train.peak_tflops={PEAK_TFLOPS}",
        ],
    )
    (trial,) = plan_sweep(experiment, smoke_workdir).trials
    (outcome,) = run_sweep(experiment, smoke_workdir)
    assert outcome.status == "done"
    mfu = tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "mfu")
    img_per_s = dict(tracking.metric_history(mlflow_uri, outcome.mlflow_run_id, "img_per_s"))
    assert [step for step, _ in mfu] == [5, 10, 15, 20]
    flops_per_image = 6 * trial.gflops * 1e9  # training FLOPs: forward + backward, 2 FLOPs per multiply-add
    for step, value in mfu:
        # img_per_s is the whole trial's (global batch / s), shared by 2 workers, each with PEAK_TFLOPS
        assert value == pytest.approx(flops_per_image * img_per_s[step] / (2 * PEAK_TFLOPS * 1e12), rel=1e-9)
        assert 0 < value <= 1


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
