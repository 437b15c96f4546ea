"""What the pipeline costs on top of the bare training step: a real one-trial sweep against the bare loop.

The trial runs through everything a sweep does (Ray Tune, Ray Train worker, the shard reader, MLflow logging every
`log_every` steps, checkpoints and milestones); its img/s is read from MLflow (median of the logging windows after
the first). The peer is the same dit_core.TrainStep (forward, hybrid loss, backward, AdamW, EMA) that the worker
runs, built by benchmarks/train_step.py, on the same preset, batch and thread count, with the batch already in
memory, timed in this process in the same run. Target: the pipeline costs at most 10% on the CPU (ratio >= 0.90),
5% on a GPU.

    python benchmarks/sweep_overhead.py [--preset DiT-d4w128/4] [--steps 400] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import OFFICIAL_MODELS, Measurement, build, timed  # noqa: E402  (benchmarks/, the script's own folder)

from pipeline import tracking  # noqa: E402
from pipeline.experiment_files import load_experiment  # noqa: E402
from pipeline.plan import plan_sweep  # noqa: E402
from pipeline.run import ensure_data  # noqa: E402
from pipeline.sweep import run_sweep  # noqa: E402


def bare_img_per_s(
    preset: str, model_config, batch: int, steps: int, threads: int, device: str, rounds: int = 5
) -> float:
    """The worker's TrainStep alone, data in memory: the median of `rounds` timed rounds of `steps` steps."""
    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    options = SimpleNamespace(
        precision="bf16" if device == "cuda" else "fp32", compile_mode="default", official=OFFICIAL_MODELS
    )
    m = Measurement("train", preset, "dit_core", "eager", batch)
    step = build(m, model_config, options, dev)  # with the trial's own config (its classes, latent size)
    timed(step, 10, dev)  # warm-up
    return statistics.median(batch / timed(step, steps, dev) for _ in range(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-d4w128/4")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default="benchmarks/results/sweep_overhead.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    threads = 2
    overrides = [
        "name=bench-overhead",
        f"grid.presets=[{args.preset}]",
        f"train.steps={args.steps}",
        f"train.global_batch_size={args.batch}",
        f"train.log_every_steps={args.log_every}",
        f"train.ckpt_every_steps={args.steps // 2}",
        f"train.milestone_steps=[{args.steps}]",
        "train.val_every_steps=1000000",
        "data.val_shards=null",
        f"resources.cpus_per_worker={threads}",
        f"resources.gpus_per_worker={1 if gpu else 0}",
        "resources.max_concurrent_trials=1",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
    ]
    experiment = load_experiment("quickstart", overrides)
    with tempfile.TemporaryDirectory() as workdir:
        import ray

        ray.init(num_cpus=None if gpu else threads, include_dashboard=False, log_to_driver=False)
        ensure_data(experiment, workdir, progress=False)
        with tracking.embedded_server(workdir) as uri:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            outcome = run_sweep(experiment, workdir)[0]
            windows = tracking.metric_history(uri, outcome.mlflow_run_id, "img_per_s")
        model_config = plan_sweep(experiment, workdir).trials[0].model
        ray.shutdown()
    pipeline_img_s = statistics.median(v for _, v in windows[1:])
    bare = bare_img_per_s(args.preset, model_config, args.batch, 100, threads, args.device)
    result = {
        "preset": args.preset,
        "batch": args.batch,
        "device": args.device,
        "threads": threads,
        "pipeline_img_s": pipeline_img_s,
        "bare_img_s": bare,
        "ratio": pipeline_img_s / bare,
        "windows": windows,
    }
    print(f"{args.preset} batch {args.batch} on {args.device} ({threads} threads)")
    print(f"  sweep trial (reader, Ray Train, MLflow, checkpoints)  {pipeline_img_s:9.1f} img/s (median window)")
    print(f"  bare dit_core step, data in memory                   {bare:9.1f} img/s")
    print(f"  ratio pipeline / bare                                 {pipeline_img_s / bare:9.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
