"""Cost of each block option against the official DiT block at the same preset.

For every option (positions=rope, mlp=swiglu, norm=rmsnorm, qk_norm, and all four together: the "modern" block)
the training step (dit_core's TrainStep, the one a sweep runs) and the sampling forward (one network evaluation,
no gradient) are measured as the official block (sin-cos, GELU, LayerNorm, no QK-norm) is, and the ratio option /
official speed is printed. The analytic Gflops of each are printed beside it: SwiGLU at 2/3 of GELU's hidden width
keeps them (within rounding), the others are elementwise and add none, so a ratio below 1 is what the option costs
in kernels the Gflops count does not see.

Each measurement is built, timed and freed before the next (benchmarks/train_step.py's `run`), so one XL/2 training
state is resident at a time, and each result is written to the JSON file as soon as it exists. The official block
is measured first in each (mode, kind) and the ratios are of medians measured one after the other.

    python benchmarks/block_options.py                  # CPU: DiT-d6w128/2 at 16 px (3 channels), fp32, eager
    python benchmarks/block_options.py --device cuda    # GPU: DiT-XL/2 at 32x32x4, bf16, eager and compiled
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import OFFICIAL_MODELS, Measurement, peak_flops_of, run, write  # noqa: E402  (benchmarks/)

from dit_core.config import DiTOptions  # noqa: E402
from dit_core.flops import param_count  # noqa: E402
from dit_core.training import enable_tf32  # noqa: E402

OPTIONS = {
    "official": {},
    "rope": {"positions": "rope"},
    "swiglu": {"mlp": "swiglu"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "modern": {"positions": "rope", "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True},
}


def plan(args) -> list[tuple[str, Measurement]]:
    """(option, measurement) in the order they run: per mode and kind, the official block first."""
    out = []
    for mode in args.modes:
        for kind, batch in (("train", args.batch), ("sample", args.sample_batch)):
            for option, fields in OPTIONS.items():
                out.append((option, Measurement(kind, args.preset, "dit_core", mode, batch, DiTOptions(**fields))))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of its device filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="default DiT-d6w128/2 (CPU), DiT-XL/2 (GPU)")
    parser.add_argument("--modes", nargs="+", default=None, choices=["eager", "compiled"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sample-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default 3 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/block_options.json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.preset = args.preset or ("DiT-XL/2" if gpu else "DiT-d6w128/2")
    args.modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.precision = "bf16" if gpu else "fp32"
    args.compile_mode = "default"
    args.official = OFFICIAL_MODELS  # unused: every measurement here is dit_core's
    args.steps = args.steps or (10 if gpu else 3)
    args.input_size, args.in_channels = (32, 4) if gpu else (16, 3)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but no CUDA device is visible")
        enable_tf32()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_flops = peak_flops_of(device, 0.0)
    print(
        f"{name}, torch {torch.__version__}, {args.precision}, {args.preset} at {args.in_channels}x{args.input_size}^2"
    )

    record, official, start = {"device": name, "preset": args.preset, "results": []}, {}, time.perf_counter()
    for option, m in plan(args):
        row = run(m, args, device, peak_flops)
        row.update(option=option, params=param_count(m.config(args)))
        if option == "official":
            official[m.mode, m.kind] = row["per_s"]
        row["ratio"] = row["per_s"] / official[m.mode, m.kind]
        record["results"].append(row)
        write(out, record)
        unit = "img/s" if m.kind == "train" else "eval/s"
        memory = f"  peak {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else ""
        mfu = f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""
        print(
            f"{m.kind:<6} {m.mode:<8} {option:<9} {row['gflops']:>9.4f} Gflops {row['params']:>13,} params "
            f"{row['per_s']:>10.1f} {unit}  x{row['ratio']:.3f} of official{mfu}{memory}",
            flush=True,
        )
    print(f"ratio = option / official block speed; {time.perf_counter() - start:.0f} s in all; wrote {out}")


if __name__ == "__main__":
    main()
