"""Where a DiT training step (or sampling forward) spends its time: time, FLOPs and bytes per kernel class.

For each preset: `torch.profiler` times a few steps of dit_core's TrainStep (what the pipeline runs) and splits the
time into classes (matmul, attention, kernels fused by torch.compile, normalization, elementwise, optimizer + EMA,
copies, other) from the op names (CPU) or kernel names (GPU). One more step runs under torch's FlopCounterMode and a
byte counter that adds up the tensors every aten op reads and writes (eager traffic: what each op would move if
nothing were fused); attention FLOPs are 4 B T^2 D per layer (x3 for a training step). Per class the script prints
time, share, GFLOP, GB, achieved TFLOP/s and GB/s: matmuls should run near the peak FLOP rate, elementwise and norm
kernels near the memory bandwidth, and their share is what fusion (torch.compile) can remove.

    python benchmarks/profile_step.py                                 # CPU: DiT-d2w48/4 and DiT-d6w128/2, 16 px, fp32
    python benchmarks/profile_step.py --device cuda                   # GPU: DiT-XL/2 at 32x32x4, batch 64, bf16
    python benchmarks/profile_step.py --device cuda --compiled --kind sample --batch 256
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import OFFICIAL_MODELS, Measurement, build  # noqa: E402  (benchmarks/, the script's own folder)

from dit_core.training import COMPILE_MODES, enable_tf32  # noqa: E402

# "other": views, allocation, Python-side op overhead
CLASSES = ("matmul", "attention", "fused", "norm", "elementwise", "optimizer+ema", "copy", "other")

# (class, substrings of an aten op name or a GPU kernel name), checked in order
RULES = [
    ("fused", ("compiledfxgraph", "cpp_fused", "triton_")),  # inductor's kernels: norm + elementwise, fused
    ("attention", ("scaled_dot_product", "flash", "fmha", "efficient_attention", "cudnn_attention", "attention")),
    ("optimizer+ema", ("adam", "_foreach", "multi_tensor_apply", "lerp")),
    (
        "matmul",
        (
            "addmm",
            "aten::mm",
            "aten::bmm",
            "baddbmm",
            "gemm",
            "matmul",
            "convolution",
            "conv2d",
            "cutlass",
            "xmma",
            "sm90_",
            "sm80_",
            "cublas",
            "nvjet",
            "mkldnn_",
            "_mm_",
        ),
    ),
    ("norm", ("layer_norm", "native_layer_norm", "layernorm", "_norm_", "norm_backward")),
    ("copy", ("copy_", "memcpy", "memset", "aten::to", "_to_copy", "clone", "contiguous", "cat", "fill_", "zero_")),
    (
        "elementwise",
        (
            "add",
            "mul",
            "sub",
            "div",
            "gelu",
            "silu",
            "exp",
            "log",
            "pow",
            "where",
            "sum",
            "mean",
            "tanh",
            "sigmoid",
            "neg",
            "sqrt",
            "rsqrt",
            "clamp",
            "elementwise",
            "vectorized",
            "reduce",
            "unrolled",
            "abs",
            "max",
            "min",
            "cos",
            "sin",
            "normal",
            "rand",
            "erf",
            "aten::gt",
            "aten::lt",
            "aten::eq",
            "aten::ne",
            "index",
            "gather",
            "addc",
        ),
    ),
]


def op_class(name: str) -> str:
    lowered = name.lower()
    for cls, keys in RULES:
        if any(k in lowered for k in keys):
            return cls
    return "other"


class ByteCounter(TorchDispatchMode):
    """Bytes each aten op reads and writes (inputs + outputs; views move nothing), per class."""

    def __init__(self):
        super().__init__()
        self.bytes = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[op_class(f"aten::{func.__name__}")] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def make_step(preset: str, args, device: torch.device):
    """(config, step): the step benchmarks/train_step.py times (TrainStep, or the sampling forward), on one model."""
    torch._dynamo.reset()  # nothing compiled for the previous preset carries over
    m = Measurement(args.kind, preset, "dit_core", "compiled" if args.compiled else "eager", args.batch)
    config = m.config(args)
    return config, build(m, config, args, device)


def profile(step, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per step in each class (device kernel time on GPU, CPU self time of aten ops on CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    seconds = defaultdict(float)
    for event in prof.key_averages():
        if gpu:
            us = getattr(event, "self_device_time_total", None)
            us = us if us is not None else event.self_cuda_time_total
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            if not (event.key.startswith("aten::") or "CompiledFxGraph" in event.key):
                continue
            us = event.self_cpu_time_total
        seconds[op_class(event.key)] += us / 1e6 / steps
    return seconds


def count(step) -> tuple[dict[str, float], dict[str, float]]:
    """(FLOPs, bytes) of one step per class, counted at the aten level."""
    flops_mode, bytes_mode = FlopCounterMode(display=False), ByteCounter()
    with flops_mode, bytes_mode:
        step()
    flops = defaultdict(float)
    for op, n in flops_mode.get_flop_counts().get("Global", {}).items():
        flops[op_class(f"aten::{getattr(op, '__name__', str(op))}")] += n
    return flops, bytes_mode.bytes


def attention_flops(config, batch: int, kind: str) -> float:
    """QK^T and PV: 4 B T^2 D per layer forward; a training step counts 3x (forward + backward), as 6N does."""
    forward = 4 * batch * config.num_tokens**2 * config.hidden_size * config.depth
    return forward * (3 if kind == "train" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default d2w48/4 d6w128/2 (CPU), XL/2 (GPU)")
    parser.add_argument("--kind", default="train", choices=["train", "sample"])
    parser.add_argument("--compiled", action="store_true", help="profile the torch.compile'd step")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default 16 CPU, 32 GPU)")
    parser.add_argument("--in-channels", type=int, default=None, help="latent channels (default 3 CPU, 4 GPU)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 CPU, bf16 GPU")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--json", default="benchmarks/results/profile_step.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    args.presets = args.presets or (["DiT-XL/2"] if gpu else ["DiT-d2w48/4", "DiT-d6w128/2"])
    args.input_size = args.input_size or (32 if gpu else 16)
    args.in_channels = args.in_channels or (4 if gpu else 3)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.official = OFFICIAL_MODELS  # unused: dit_core's step only
    device = torch.device(args.device)
    if gpu:
        enable_tf32()  # as train_step.py and the pipeline's workers run
    name = torch.cuda.get_device_name() if gpu else "cpu"
    report = {
        "device": name,
        "torch": torch.__version__,
        "kind": args.kind,
        "compiled": args.compiled,
        "precision": args.precision,
        "batch": args.batch,
        "presets": {},
    }
    for preset in args.presets:
        config, step = make_step(preset, args, device)
        for _ in range(3):
            step()  # warm-up (and compilation)
        seconds = profile(step, device, args.steps)
        flops, moved = count(step)
        flops["attention"] = attention_flops(config, args.batch, args.kind)  # the counter misses CPU SDPA kernels
        total = sum(seconds.values())
        mode = "compiled" if args.compiled else "eager"
        print(
            f"\n{preset} {args.kind} step, {mode}, {args.precision}, batch {args.batch}, {name}: "
            f"{total * 1e3:.1f} ms profiled per step (FLOPs and bytes counted eagerly, per aten op)"
        )
        print(f"{'class':<14} {'ms':>8} {'share':>7} {'GFLOP':>9} {'GB':>8} {'TFLOP/s':>8} {'GB/s':>8}")
        rows = {}
        for cls in CLASSES:
            s, f, b = seconds.get(cls, 0.0), flops.get(cls, 0.0), moved.get(cls, 0.0)
            if not (s or f or b):
                continue
            rows[cls] = {"ms": s * 1e3, "share": s / total if total else 0.0, "gflop": f / 1e9, "gb": b / 1e9}
            rate = f"{f / s / 1e12:>8.2f}" if s and f else f"{'-':>8}"
            # eager traffic over compiled time would overstate bandwidth: only eager steps get GB/s
            bandwidth = f"{b / s / 1e9:>8.1f}" if s and b and not args.compiled else f"{'-':>8}"
            print(
                f"{cls:<14} {s * 1e3:>8.2f} {rows[cls]['share']:>7.1%} {f / 1e9:>9.2f} {b / 1e9:>8.3f} "
                f"{rate} {bandwidth}"
            )
        report["presets"][preset] = {"ms_per_step": total * 1e3, "classes": rows}
        del step
        if gpu:
            torch.cuda.empty_cache()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
