"""Speed, MFU and memory of dit_core's training step and sampling forward against a peer implementation of the same
network, eager and compiled: the official DiT code (facebookresearch/DiT's models.py, the code behind the anchors of
the peers' H200 table) on a GPU, diffusers' DiTTransformer2DModel on the CPU.

Training step = dit_core's TrainStep, the one pipeline/train.py runs: forward, the paper's hybrid loss (the same
GaussianDiffusion code for every implementation), backward, AdamW (fused on GPU) and the EMA update (one foreach
lerp), with no host synchronisation inside the step (on a GPU the script checks this with
torch.cuda.set_sync_debug_mode). It reports which SDPA attention implementation runs. Sampling forward = one network
evaluation at the FID batch, no gradient, no guidance. Modes: eager, compiled (train.compile: model, noising and loss
compiled) and compiled-model (the model alone; what compiling the loss adds).

One measurement (kind, preset, implementation, mode) at a time: it is built (`build`: model, and for a training step
its AdamW and EMA), warmed up (and compiled), timed in --rounds rounds of --steps steps, and freed before the next is
built, so that only one training state is ever resident (DiT-XL/2 at batch 64: at most 52 GiB by the upper-bound
count of tests/test_benchmarks_memory.py, which runs `build` on the meta device). Each result is written to the JSON
file as soon as it exists, so a run cut short keeps what it measured. A ratio (dit_core / peer, compiled / eager) is
of the medians of two measurements made one after the other: on a shared machine, drift between them is not
cancelled.
On a GPU the most important measurements come first (XL/2 against the official code, then the XL/2 sampling forward,
then S/2, B/2 and L/2), and one that would end after --budget-s is skipped.

MFU = 6 x paper Gflops x img/s (training) or 2 x Gflops x evaluations/s (sampling) over the device's dense bf16
datasheet peak (dit_core.flops.DEVICE_PEAKS; --peak-tflops for another device). Peak memory = the largest
torch.cuda.max_memory_allocated() of the measurement alone.

    python benchmarks/train_step.py                    # CPU: d2w48 and d6w128 at patch 4 and 2, 16 px, fp32, eager
    python benchmarks/train_step.py --device cuda      # GPU: XL/2 against the official code (--official), sampling
                                                       # at 256, S/2 B/2 L/2; 32x32x4, batch 64, bf16, eager+compiled
    python benchmarks/train_step.py --modes eager compiled-model compiled --sample-presets DiT-d6w128/2   # CPU

The official code is not part of this repository: give its models.py with --official (default
.whl/official_dit_models.py, beside the wheels benchmarks/gpu_suite.sh installs; it imports timm).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.config import DiTConfig, DiTOptions, dit_config  # noqa: E402
from dit_core.diffusion import GaussianDiffusion  # noqa: E402
from dit_core.ema import create_ema  # noqa: E402
from dit_core.flops import device_peak, gflops  # noqa: E402
from dit_core.interop import to_diffusers  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.training import COMPILE_MODES, TrainStep, adamw, enable_tf32  # noqa: E402

CPU_PRESETS = ["DiT-d2w48/4", "DiT-d2w48/2", "DiT-d6w128/4", "DiT-d6w128/2"]  # the figures in docs/performance.md
GRID = ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]
OFFICIAL_MODELS = ".whl/official_dit_models.py"


@dataclass(frozen=True)
class Measurement:
    """One thing timed: a training step or a sampling forward of one implementation in one mode."""

    kind: str  # "train" (TrainStep: forward, loss, backward, AdamW, EMA) or "sample" (one evaluation, no gradient)
    preset: str  # e.g. "DiT-XL/2"
    implementation: str  # "dit_core", "official" (facebookresearch/DiT's models.py) or "diffusers"
    mode: str  # "eager", "compiled" (model, noising and loss) or "compiled-model" (the model alone)
    batch: int  # images per step
    design: DiTOptions = field(default_factory=DiTOptions)  # dit_core's block options (the official block: default)

    def config(self, args) -> DiTConfig:
        return dit_config(
            self.preset, self.design, input_size=args.input_size, in_channels=args.in_channels, num_classes=1000
        )


# ---------------------------------------------------------------------------------------------------------------
# Building one measurement (on any device, the meta device included)
# ---------------------------------------------------------------------------------------------------------------


class DiffusersAdapter(torch.nn.Module):
    """diffusers' DiT behind dit_core's forward(x, t, y) signature."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y):
        return self.transformer(x, t, y).sample


def official_models(path: str) -> dict:
    """The `DiT_models` registry of facebookresearch/DiT's models.py at `path` (its presets have our names)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no official models.py at {path}: copy facebookresearch/DiT's models.py there")
    spec = importlib.util.spec_from_file_location("official_dit_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DiT_models


def build_model(m: Measurement, config: DiTConfig, device: torch.device, official: str) -> torch.nn.Module:
    """The network of `m`, initialised on `device` (no host copy; nothing allocated on meta), seed 0."""
    torch.manual_seed(0)
    with device:
        if m.implementation == "official":
            model = official_models(official)[m.preset](
                input_size=config.input_size, in_channels=config.in_channels, num_classes=config.num_classes
            )
        else:
            model = DiT(config)
    if m.implementation == "diffusers":
        model = DiffusersAdapter(to_diffusers(model)).to(device)
    return model.train(m.kind == "train")


def inputs(config: DiTConfig, batch: int, device: torch.device, seed: int = 0):
    """(x, y, t): latents, labels and timesteps drawn on the host with `seed`, then moved: the same on any device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), y.to(device), t.to(device)


def build(m: Measurement, config: DiTConfig, args, device: torch.device) -> Callable[[], object]:
    """One step of `m` with its own weights (and, for training, AdamW and EMA): a callable that runs it once.

    args: precision ("bf16" autocast or "fp32"), compile_mode, official (path of the official models.py)."""
    model = build_model(m, config, device, args.official)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    compile_mode = None if args.compile_mode == "default" else args.compile_mode
    x, y, t = inputs(config, m.batch, device, seed=0 if m.kind == "train" else 1)
    if m.kind == "train":
        step = TrainStep(
            model,
            GaussianDiffusion(),
            adamw(model),
            create_ema(model),
            ema_decay=0.9999,
            autocast_dtype=autocast_dtype,
            compile=m.mode != "eager",
            compile_mode=args.compile_mode,
            compile_loss=m.mode == "compiled",
        )
        return lambda: step(x, y)
    forward = torch.compile(model, mode=compile_mode) if m.mode != "eager" else model  # no loss to compile here
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    def sample_step():
        with torch.no_grad(), autocast:
            return forward(x, t, y)

    return sample_step


# ---------------------------------------------------------------------------------------------------------------
# Timing one measurement
# ---------------------------------------------------------------------------------------------------------------


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


def attention_ops(step) -> list[str]:
    """The SDPA implementations one call of `step` runs (flash, memory-efficient, cuDNN or math), by aten op name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_flash"))


def host_syncs(step) -> str:
    """'none' if one call of `step` makes no host-device synchronisation, else the first one's error (CUDA only)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def free(device: torch.device) -> float:
    """Drop what the last measurement left (compiled graphs, cached blocks); GiB still allocated (0 unless leaked)."""
    torch._dynamo.reset()
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def run(m: Measurement, args, device: torch.device, peak_flops: float | None) -> dict:
    """Build, warm up (compile), time and free `m`: its result row."""
    config = m.config(args)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step = build(m, config, args, device)
    timed(step, args.warmup, device)
    per_round = [timed(step, args.steps, device) for _ in range(args.rounds)]
    rate = m.batch / statistics.median(per_round)  # img/s (train), network evaluations/s (sample)
    row = {
        **asdict(m),
        "design": {k: v for k, v in asdict(m.design).items() if v != getattr(DiTOptions(), k)},
        "gflops": gflops(config),
        "precision": args.precision,
        "per_s": rate,
        "per_s_rounds": [m.batch / s for s in per_round],
        "attention_ops": attention_ops(step),
    }
    if peak_flops:
        row["mfu"] = (6 if m.kind == "train" else 2) * gflops(config) * 1e9 * rate / peak_flops
    if gpu:
        row["host_syncs"] = host_syncs(step)
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del step
    row["left_allocated_gib"] = free(device)
    row["seconds"] = time.perf_counter() - start  # build, compile, warm-up, timing and freeing
    return row


# ---------------------------------------------------------------------------------------------------------------
# The plan and the report
# ---------------------------------------------------------------------------------------------------------------


def plan(args) -> list[Measurement]:
    """Every measurement, most important first, so that a run cut short by the budget keeps what matters most: the
    presets compared with the peer (each mode: dit_core, then the peer), the sampling forward, then the rest."""
    peers = [p for p in args.presets if p in args.peer_presets and args.peer != "none"]
    train_modes, sample_modes = args.modes, [m for m in args.modes if m != "compiled-model"]  # no loss in sampling
    out = []
    for preset in peers:
        for mode in train_modes:
            out += [Measurement("train", preset, impl, mode, args.batch) for impl in ("dit_core", args.peer)]
    for preset in args.sample_presets:
        out += [Measurement("sample", preset, "dit_core", mode, args.sample_batch) for mode in sample_modes]
    for preset in args.presets:
        if preset not in peers:
            out += [Measurement("train", preset, "dit_core", mode, args.batch) for mode in train_modes]
    return out


def row_text(r: dict) -> str:
    unit = "img/s" if r["kind"] == "train" else "eval/s"
    line = (
        f"{r['kind']:<6} {r['mode']:<14} {r['preset']:<12} {r['implementation']:<9} {r['batch']:>5} "
        f"{r['gflops']:>8.3f} {r['per_s']:>9.1f} {unit:<6}"
    )
    if "mfu" in r:
        line += f" MFU {r['mfu']:>6.1%}"
    if "peak_memory_gib" in r:
        line += f"  peak {r['peak_memory_gib']:>5.1f} GiB"
    return line + f"  ({r['seconds']:.0f} s)"


def comparisons(results: list[dict], peer: str) -> list[str]:
    """dit_core against the peer (same kind, preset, mode) and compiled against eager, from the rows measured."""
    index = {(r["kind"], r["preset"], r["implementation"], r["mode"]): r for r in results}
    lines = []
    for (kind, preset, impl, mode), r in index.items():
        other = index.get((kind, preset, peer, mode))
        if impl == "dit_core" and other is not None:
            memory = ""
            if "peak_memory_gib" in r:
                memory = f", peak memory {r['peak_memory_gib']:.1f} / {other['peak_memory_gib']:.1f} GiB"
            mfu = f", MFU {r['mfu']:.1%} / {other['mfu']:.1%}" if "mfu" in r else ""
            lines.append(
                f"{kind} {preset} {mode}: dit_core / {peer} = {r['per_s'] / other['per_s']:.3f}x "
                f"({r['per_s']:.1f} / {other['per_s']:.1f}{mfu}{memory})"
            )
        eager = index.get((kind, preset, impl, "eager"))
        if mode != "eager" and eager is not None:
            lines.append(f"{kind} {preset} {impl}: {mode} / eager = {r['per_s'] / eager['per_s']:.2f}x")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults of its device filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default: d2w48/d6w128 x 4/2 (CPU), S..XL/2 (GPU)")
    parser.add_argument(
        "--peer", default=None, choices=["official", "diffusers", "none"], help="official (GPU), diffusers (CPU)"
    )
    parser.add_argument("--official", default=OFFICIAL_MODELS, help="facebookresearch/DiT's models.py")
    parser.add_argument(
        "--peer-presets",
        nargs="+",
        default=None,
        help="presets also run with the peer (default: all on CPU, DiT-XL/2 on GPU)",
    )
    parser.add_argument(
        "--sample-presets",
        nargs="*",
        default=None,
        help="presets whose sampling forward is measured (default: none on CPU, DiT-XL/2 on GPU)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=["eager", "compiled", "compiled-model"],
        help="default eager (CPU), eager compiled (GPU); compiled-model: loss eager",
    )
    parser.add_argument("--batch", type=int, default=64, help="training batch per device")
    parser.add_argument("--sample-batch", type=int, default=256, help="sampling batch")
    parser.add_argument("--input-size", type=int, default=None, help="latent side (default 16 CPU, 32 GPU)")
    parser.add_argument("--in-channels", type=int, default=None, help="latent channels (default 3 CPU, 4 GPU)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default fp32 CPU, bf16 GPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round (default 5 CPU, 10 GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="one device's peak; 0: the GPU's datasheet figure"
    )
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip what would end after this many s (default 240 GPU, none CPU)"
    )
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.presets = args.presets or (GRID if gpu else CPU_PRESETS)
    args.peer = args.peer or ("official" if gpu else "diffusers")
    args.peer_presets = args.peer_presets or (["DiT-XL/2"] if gpu else args.presets)
    args.sample_presets = args.sample_presets if args.sample_presets is not None else (["DiT-XL/2"] if gpu else [])
    args.modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.input_size = args.input_size or (32 if gpu else 16)
    args.in_channels = args.in_channels or (4 if gpu else 3)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (10 if gpu else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (240.0 if gpu else 0.0)
    return args


def peak_flops_of(device: torch.device, peak_tflops: float) -> float | None:
    """One device's peak FLOP/s for MFU: --peak-tflops, else the GPU's datasheet figure; None on a CPU or an
    unlisted GPU (then no MFU is printed)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    peak = device_peak(torch.cuda.get_device_name())
    if peak is None:
        print(f"no dense bf16 peak is listed for {torch.cuda.get_device_name()!r}: give --peak-tflops for MFU")
    return None if peak is None else peak.flops


def write(path: Path, record: dict) -> None:
    """Replace `path` with `record` whole (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


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
    peak_flops = peak_flops_of(device, args.peak_tflops)
    peak_text = f", MFU of {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else ""
    latents = f"{args.in_channels}x{args.input_size}^2"
    print(f"{name}, torch {torch.__version__}, {args.precision}, latents {latents}{peak_text}")
    record = {
        "device": name,
        "torch": torch.__version__,
        "peak_tflops": (peak_flops or 0) / 1e12,
        "results": [],
        "skipped": [],
        "failed": [],
    }
    took: dict[str, float] = {}  # longest seconds so far per mode: the estimate for the next of that mode
    start = time.perf_counter()
    for m in plan(args):
        label = f"{m.kind} {m.preset} {m.implementation} {m.mode}"
        if args.budget_s and time.perf_counter() - start + took.get(m.mode, 0.0) > args.budget_s:
            record["skipped"].append(label)
            continue
        try:
            row = run(m, args, device, peak_flops)
        except (FileNotFoundError, ImportError) as error:  # the peer's code is missing: measure the rest
            record["failed"].append(f"{label}: {str(error).splitlines()[0]}")
            print(f"{label}: not measured ({record['failed'][-1]})", flush=True)
            free(device)
            continue
        took[m.mode] = max(took.get(m.mode, 0.0), row["seconds"])
        record["results"].append(row)
        write(out, record)
        print(row_text(row), flush=True)
    write(out, record)
    for r in record["results"]:
        syncs = f", host syncs in the step: {r['host_syncs']}" if "host_syncs" in r else ""
        what = f"{r['kind']} {r['preset']} {r['implementation']} {r['mode']}"
        print(f"{what}: attention {', '.join(r['attention_ops'])}{syncs}")
    print("\n".join(comparisons(record["results"], args.peer)))
    if record["skipped"]:
        print(f"skipped to stay within --budget-s {args.budget_s:.0f}: {'; '.join(record['skipped'])}")
    print(f"{time.perf_counter() - start:.0f} s in all; wrote {out}")


if __name__ == "__main__":
    main()
