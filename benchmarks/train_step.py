"""Training-step throughput: dit_core's DiT against diffusers' DiTTransformer2DModel, side by side in one run.

One step = forward, the paper's hybrid loss (same GaussianDiffusion code for both), backward, AdamW. Both models
hold the same weights (diffusers' is exported from ours). Measurements alternate A, B, A, B ... in rounds so that
drift of a shared machine hits both; the ratio is taken per round and its median printed.

    python benchmarks/train_step.py                          # CPU: tiny presets of the quickstart
    python benchmarks/train_step.py --device cuda            # GPU: DiT-XL/2, batch 64, bf16 autocast, MFU
    python benchmarks/train_step.py --device cuda --presets DiT-S/2 DiT-B/2 DiT-L/2 DiT-XL/2 --compile

Prints img/s for each implementation, the ratio dit_core / diffusers, and on GPU the MFU against 790 TFLOP/s
(6 x paper Gflops x img/s); writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.diffusion import GaussianDiffusion, sample_timesteps  # noqa: E402
from dit_core.flops import H200_BF16_PEAK_FLOPS, gflops, train_mfu  # noqa: E402
from dit_core.interop import to_diffusers  # noqa: E402
from dit_core.model import DiT, dit_config  # noqa: E402


class DiffusersAdapter(torch.nn.Module):
    """diffusers' DiT behind dit_core's forward(x, t, y) signature."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y):
        return self.transformer(x, t, y).sample


def make_step(model, device: torch.device, batch: int, config, precision: str, compile_model: bool):
    diffusion = GaussianDiffusion()
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused)
    forward = torch.compile(model) if compile_model else model
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        t = sample_timesteps(batch, 1000, device=device, generator=g)
        with autocast:
            loss = diffusion.training_losses(forward, x0, t, y)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, n: int, device: torch.device) -> float:
    """Seconds per step over n steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def bench_preset(args, preset: str, device: torch.device) -> dict:
    config = dit_config(preset, input_size=args.input_size, in_channels=args.in_channels, num_classes=1000)
    torch.manual_seed(0)
    ours = DiT(config).to(device).train()
    theirs = DiffusersAdapter(to_diffusers(ours)).to(device).train()
    steps = {
        "dit_core": make_step(ours, device, args.batch, config, args.precision, args.compile),
        "diffusers": make_step(theirs, device, args.batch, config, args.precision, args.compile),
    }
    for step in steps.values():  # warm-up (and compilation)
        timed(step, args.warmup, device)
    per_round = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            per_round[name].append(timed(step, args.steps, device))
    result = {
        "preset": preset,
        "batch": args.batch,
        "gflops": gflops(config),
        "precision": args.precision,
        "compile": args.compile,
        "device": str(device),
    }
    for name, times in per_round.items():
        img_s = args.batch / statistics.median(times)
        result[f"{name}_img_s"] = img_s
        if device.type == "cuda":
            result[f"{name}_mfu"] = train_mfu(config, img_s, args.peak_flops)
    ratios = [b / a for a, b in zip(per_round["dit_core"], per_round["diffusers"])]  # time ratio = speed ratio
    result["ratio"] = statistics.median(ratios)
    result["ratio_min_max"] = [min(ratios), max(ratios)]
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default: DiT-Ti/2 DiT-Mi/4 (CPU), DiT-XL/2 (GPU)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default 32 CPU, 64 GPU)")
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default 16 CPU, 32 GPU)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 CPU, bf16 GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK_FLOPS)
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    args.presets = args.presets or (["DiT-XL/2"] if gpu else ["DiT-Ti/2", "DiT-Mi/4"])
    args.batch = args.batch or (64 if gpu else 32)
    args.input_size = args.input_size or (32 if gpu else 16)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (10 if gpu else 5)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)

    results = []
    print(
        f"{'preset':<10} {'batch':>5} {'Gflops':>8} {'dit_core img/s':>15} {'diffusers img/s':>16} {'ratio':>6}"
        + (f" {'MFU ours':>9} {'MFU diffusers':>14}" if gpu else "")
    )
    for preset in args.presets:
        r = bench_preset(args, preset, device)
        results.append(r)
        line = (
            f"{preset:<10} {r['batch']:>5} {r['gflops']:>8.3f} {r['dit_core_img_s']:>15.1f} "
            f"{r['diffusers_img_s']:>16.1f} {r['ratio']:>6.3f}"
        )
        if gpu:
            line += f" {r['dit_core_mfu']:>9.1%} {r['diffusers_mfu']:>14.1%}"
        print(line, flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    print(f"ratio = dit_core img/s / diffusers img/s (median over {args.rounds} alternating rounds); wrote {out}")


if __name__ == "__main__":
    main()
