"""Cost of each block option against the official DiT block at the same preset, side by side in one run.

For every option (positions=rope, mlp=swiglu, norm=rmsnorm, qk_norm, and all four together: the "modern" block)
the training step (dit_core's TrainStep, the one a sweep runs) and the sampling forward (one network evaluation,
no gradient) are timed in the same alternating rounds as the official block (sin-cos, GELU, LayerNorm, no QK-norm),
and the ratio option / official speed is the median over rounds. The analytic Gflops of each are printed beside it:
SwiGLU at 2/3 of GELU's hidden width keeps them (within rounding), the others are elementwise and add none, so a
ratio below 1 is what the option costs in kernels the Gflops count does not see.

    python benchmarks/block_options.py                  # CPU: DiT-d6w128/2 at 16 px (3 channels), fp32, eager
    python benchmarks/block_options.py --device cuda    # GPU: DiT-XL/2 at 32x32x4, bf16, eager and compiled
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

from train_step import make_sample_step, make_train_step, measure  # noqa: E402  (benchmarks/, this folder)

from dit_core.config import DiTOptions, dit_config  # noqa: E402
from dit_core.flops import gflops, param_count  # noqa: E402
from dit_core.model import DiT  # noqa: E402

OPTIONS = {
    "official": {},
    "rope": {"positions": "rope"},
    "swiglu": {"mlp": "swiglu"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "modern": {"positions": "rope", "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="default DiT-d6w128/2 (CPU), DiT-XL/2 (GPU)")
    parser.add_argument("--modes", nargs="+", default=None, choices=["eager", "compiled"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=None, help="default 256 (CPU and GPU)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default 3 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/block_options.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    preset = args.preset or ("DiT-XL/2" if gpu else "DiT-d6w128/2")
    modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.precision = "bf16" if gpu else "fp32"
    args.compile_mode = "default"
    args.steps = args.steps or (10 if gpu else 3)
    sample_batch = args.sample_batch or 256
    size, channels = (32, 4) if gpu else (16, 3)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.precision}, {preset} at {channels}x{size}^2")

    results, start = [], time.perf_counter()
    for mode in modes:
        for kind, make, batch in (("train", make_train_step, args.batch), ("sample", make_sample_step, sample_batch)):
            torch._dynamo.reset()
            steps, facts = {}, {}
            for option, fields in OPTIONS.items():
                config = dit_config(preset, DiTOptions(**fields), input_size=size, in_channels=channels)
                torch.manual_seed(0)
                model = DiT(config).to(device).train(kind == "train")
                steps[option] = make(model, device, batch, config, args, "" if mode == "eager" else "compiled")
                facts[option] = {"gflops": gflops(config), "params": param_count(config)}
            per_round = measure(steps, args, device)
            for option in OPTIONS:
                ratio = statistics.median(
                    official / mine for official, mine in zip(per_round["official"], per_round[option])
                )
                rate = batch / statistics.median(per_round[option])
                results.append({"kind": kind, "mode": mode, "option": option, "per_s": rate, "ratio": ratio,
                                **facts[option]})  # fmt: skip
                unit = "img/s" if kind == "train" else "eval/s"
                print(
                    f"{kind:<6} {mode:<8} {option:<9} {facts[option]['gflops']:>9.4f} Gflops "
                    f"{facts[option]['params']:>13,} params {rate:>10.1f} {unit}  x{ratio:.3f} of official",
                    flush=True,
                )
            out.write_text(json.dumps({"device": name, "preset": preset, "results": results}, indent=2))
    print(f"ratio = option / official speed, median over {args.rounds} alternating rounds; "
          f"{time.perf_counter() - start:.0f} s in all; wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
