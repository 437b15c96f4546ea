"""What the pipeline costs on top of the bare training step: a real one-trial sweep against the bare loop.

The trial runs through everything a sweep does (Ray Tune, Ray Train worker, the shard reader, MLflow logging every
`log_every` steps, checkpoints and milestones); its img/s is read from MLflow (median of the logging windows after
the first). The peer is dit_core's bare step (forward, hybrid loss, backward, AdamW, EMA) on the same preset, batch
and thread count, with the batch already in memory, timed in this process in the same run. Target: the pipeline
costs at most 10% on the CPU (ratio >= 0.90), 5% on a GPU.

    python benchmarks/sweep_overhead.py [--preset DiT-Mi/4] [--steps 400] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.diffusion import GaussianDiffusion  # noqa: E402
from dit_core.ema import create_ema, update_ema  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from pipeline import tracking  # noqa: E402
from pipeline.config import load_experiment  # noqa: E402
from pipeline.run import ensure_data  # noqa: E402
from pipeline.sweep import plan_sweep, run_sweep  # noqa: E402


def bare_img_per_s(model_config, batch: int, steps: int, threads: int, device: str, rounds: int = 5) -> float:
    """dit_core's training step alone, data in memory: the median of `rounds` timed rounds of `steps` steps."""
    if device == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DiT(model_config).to(device).train()
    ema = create_ema(model)
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device == "cuda")
    shape = (batch, model_config.in_channels, model_config.input_size, model_config.input_size)
    z, y = torch.randn(shape, device=device), torch.randint(0, model_config.num_classes, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            loss = diffusion.training_losses(model, z, t, y)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.9999)

    for _ in range(10):
        step()
    rates = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-Mi/4")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", default="benchmarks/results/sweep_overhead.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    threads = 2
    overrides = [
        "name=bench-overhead", f"grid.presets=[{args.preset}]", f"train.steps={args.steps}",
        f"train.global_batch_size={args.batch}", f"train.log_every_steps={args.log_every}",
        f"train.ckpt_every_steps={args.steps // 2}", f"train.milestone_steps=[{args.steps}]",
        "train.val_every_steps=1000000", "data.val_shards=null", f"resources.cpus_per_worker={threads}",
        f"resources.gpus_per_worker={1 if gpu else 0}", "resources.max_concurrent_trials=1",
        "train.lr_schedule=constant", "train.warmup_steps=0",
    ]  # fmt: skip
    experiment = load_experiment("quickstart", overrides)
    with tempfile.TemporaryDirectory() as workdir:
        import ray

        ray.init(num_cpus=None if gpu else threads, include_dashboard=False, log_to_driver=False)
        ensure_data(experiment, workdir, progress=False)
        with tracking.embedded_server(workdir) as uri:
            import os

            os.environ["MLFLOW_TRACKING_URI"] = uri
            outcome = run_sweep(experiment, workdir)[0]
            windows = tracking.metric_history(uri, outcome.mlflow_run_id, "img_per_s")
        model_config = plan_sweep(experiment, workdir).trials[0].model
        ray.shutdown()
    pipeline_img_s = statistics.median(v for _, v in windows[1:])
    bare = bare_img_per_s(model_config, args.batch, 100, threads, args.device)
    result = {"preset": args.preset, "batch": args.batch, "device": args.device, "threads": threads,
              "pipeline_img_s": pipeline_img_s, "bare_img_s": bare, "ratio": pipeline_img_s / bare,
              "windows": windows}  # fmt: skip
    print(f"{args.preset} batch {args.batch} on {args.device} ({threads} threads)")
    print(f"  sweep trial (reader, Ray Train, MLflow, checkpoints)  {pipeline_img_s:9.1f} img/s (median window)")
    print(f"  bare dit_core step, data in memory                   {bare:9.1f} img/s")
    print(f"  ratio pipeline / bare                                 {pipeline_img_s / bare:9.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
