"""Speed of dit_core's training step and sampling forward against diffusers' DiTTransformer2DModel, eager and
compiled, side by side in one run.

Training step = dit_core's TrainStep, the one pipeline/train.py runs: forward, the paper's hybrid loss (the same
GaussianDiffusion code for both models), backward, AdamW (fused on GPU) and the EMA update (one foreach lerp), with no
host synchronisation inside the step (on a GPU the script checks this with torch.cuda.set_sync_debug_mode). It
reports which SDPA attention implementation runs. Sampling forward = one network evaluation at the FID batch, no
gradient, no guidance. Both implementations hold the same weights (diffusers' is exported from ours).

For each preset, every (implementation, mode) step is timed in the same alternating rounds (dit_core eager,
diffusers eager, dit_core compiled, ...) so that drift of a shared machine hits all of them; each ratio (dit_core /
diffusers, compiled / eager) is taken per round and its median printed. Results are written to the JSON file after
every preset, so a run cut short keeps what it measured. On a GPU the most important measurements come first (XL/2
against diffusers, then its sampling forward), and those that would end after --budget-s (270 s) are skipped, so
one call fits a 5-minute slot. Modes: eager, compiled (train.compile: model, noising and loss compiled) and
compiled-model (the model alone; what compiling the loss adds).

    python benchmarks/train_step.py                    # CPU: d2w48 and d6w128 at patch 4 and 2, 16 px, fp32, eager
    python benchmarks/train_step.py --device cuda      # GPU: S/2 B/2 L/2 XL/2 at 256 px (32x32x4), batch 64, bf16,
                                                       # eager and compiled; XL/2 against diffusers; sampling at 256
    python benchmarks/train_step.py --modes eager compiled-model compiled --sample-presets DiT-d6w128/2   # CPU

MFU = 6 x paper Gflops x img/s / peak for training, 2 x paper Gflops x evaluations/s / peak for sampling (peak: the
H200's 790 TFLOP/s bf16 unless --peak-flops).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_core.config import dit_config  # noqa: E402
from dit_core.diffusion import GaussianDiffusion  # noqa: E402
from dit_core.ema import create_ema  # noqa: E402
from dit_core.flops import H200_BF16_PEAK_FLOPS, gflops  # noqa: E402
from dit_core.interop import to_diffusers  # noqa: E402
from dit_core.model import DiT  # noqa: E402
from dit_core.training import COMPILE_MODES, TrainStep, adamw  # noqa: E402

CPU_PRESETS = ["DiT-d2w48/4", "DiT-d2w48/2", "DiT-d6w128/4", "DiT-d6w128/2"]  # the figures in docs/performance.md
GRID = ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]


class DiffusersAdapter(torch.nn.Module):
    """diffusers' DiT behind dit_core's forward(x, t, y) signature."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y):
        return self.transformer(x, t, y).sample


def _inputs(config, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, device=device, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), device=device, generator=g)
    return x, y, g


def make_train_step(model, device: torch.device, batch: int, config, args, compiled: str):
    """One training step of `model` (fresh AdamW and EMA): dit_core's TrainStep, the one pipeline/train.py runs.

    compiled: "" (eager), "compiled" (model, noising and loss compiled: train.compile) or "compiled-model" (the model
    alone, the loss eager: how much compiling the loss adds)."""
    ema = create_ema(model)
    step = TrainStep(
        model,
        GaussianDiffusion(),
        adamw(model),
        ema,
        ema_decay=0.9999,
        autocast_dtype=torch.bfloat16 if args.precision == "bf16" else None,
        compile=compiled != "",
        compile_mode=args.compile_mode,
        compile_loss=compiled == "compiled",
    )
    x0, y, _ = _inputs(config, batch, device)
    return lambda: step(x0, y)


def make_sample_step(model, device: torch.device, batch: int, config, args, compiled: str):
    """One network evaluation at the sampling batch (no gradient, no guidance)."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    forward = torch.compile(model, mode=mode) if compiled else model  # no loss here: compiled-model = compiled
    x, y, g = _inputs(config, batch, device, seed=1)
    t = torch.randint(0, 1000, (batch,), device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with torch.no_grad(), autocast:
            forward(x, t, y)

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


def measure(steps: dict, args, device: torch.device) -> dict[str, list[float]]:
    """Warm up (and compile) every step, then time them in alternating rounds: {name: [s per step per round]}."""
    for step in steps.values():
        timed(step, args.warmup, device)
    per_round = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            per_round[name].append(timed(step, args.steps, device))
    return per_round


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


def bench(args, preset: str, kind: str, modes: list[str], with_peer: bool, device: torch.device) -> list[dict]:
    """One row per mode for `preset`: every (implementation, mode) step is timed in the same alternating rounds, so
    that dit_core / diffusers and compiled / eager are both ratios measured side by side."""
    config = dit_config(preset, input_size=args.input_size, in_channels=args.in_channels, num_classes=1000)
    torch._dynamo.reset()  # no graphs, guards or dynamic-shape decisions carried over from the previous preset
    torch.manual_seed(0)
    ours = DiT(config).to(device)
    models = {"dit_core": ours}
    if with_peer:
        models["diffusers"] = DiffusersAdapter(to_diffusers(ours)).to(device)
    batch = args.batch if kind == "train" else args.sample_batch
    make = make_train_step if kind == "train" else make_sample_step
    steps = {}
    for mode in modes:
        for name, base in models.items():
            model = copy.deepcopy(base).train(kind == "train")  # each step its own weights, optimizer and EMA
            steps[name, mode] = make(model, device, batch, config, args, "" if mode == "eager" else mode)
    del models, ours
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    per_round = measure(steps, args, device)
    seconds = time.perf_counter() - start

    def speedup(a, b):  # median over rounds of time(b) / time(a) = speed(a) / speed(b)
        return statistics.median(tb / ta for ta, tb in zip(per_round[a], per_round[b]))

    results = []
    for mode in modes:
        result = {
            "preset": preset,
            "kind": kind,
            "mode": mode,
            "batch": batch,
            "gflops": gflops(config),
            "precision": args.precision,
            "device": str(device),
            "seconds_incl_warmup": seconds,
        }
        for name in ("dit_core", "diffusers"):
            if (name, mode) not in per_round:
                continue
            rate = batch / statistics.median(per_round[name, mode])  # img/s (train), network evaluations/s (sample)
            result[f"{name}_per_s"] = rate
            if device.type == "cuda":
                flops_per_item = (6 if kind == "train" else 2) * gflops(config) * 1e9
                result[f"{name}_mfu"] = flops_per_item * rate / args.peak_flops
        if with_peer:
            result["ratio"] = speedup(("dit_core", mode), ("diffusers", mode))
            ratios = [b / a for a, b in zip(per_round["dit_core", mode], per_round["diffusers", mode])]
            result["ratio_min_max"] = [min(ratios), max(ratios)]
        for base in ("eager", "compiled-model"):
            if base != mode and base in modes and mode != "eager":
                result[f"speedup_vs_{base}"] = speedup(("dit_core", mode), ("dit_core", base))
        result["attention_ops"] = attention_ops(steps["dit_core", mode])
        if device.type == "cuda":
            result["host_syncs"] = host_syncs(steps["dit_core", mode])
            result["peak_memory_gib_all_steps"] = torch.cuda.max_memory_allocated() / 2**30
        results.append(result)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def plan_measurements(presets, peers, sample_presets) -> list[tuple[str, str]]:
    """(kind, preset) in order of importance, so that a run cut short by the budget keeps what matters most: the
    presets compared with diffusers, then the sampling forward, then the rest."""
    first = [("train", p) for p in presets if p in peers] + [("sample", p) for p in sample_presets]
    return first + [("train", p) for p in presets if p not in peers]


def row(r: dict, gpu: bool) -> str:
    unit = "img/s" if r["kind"] == "train" else "eval/s"
    peer = f"{r['diffusers_per_s']:>12.1f}" if "diffusers_per_s" in r else f"{'-':>12}"
    ratio = f"{r['ratio']:>6.3f}" if "ratio" in r else f"{'-':>6}"
    line = (
        f"{r['kind']:<6} {r['mode']:<14} {r['preset']:<11} {r['batch']:>5} {r['gflops']:>8.3f} "
        f"{r['dit_core_per_s']:>12.1f} {peer} {ratio} {unit}"
    )
    if gpu:
        peer_mfu = f"{r['diffusers_mfu']:>8.1%}" if "diffusers_mfu" in r else f"{'-':>8}"
        line += f"   MFU {r['dit_core_mfu']:>6.1%} {peer_mfu}   {r['peak_memory_gib_all_steps']:.1f} GiB"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=None, help="default: d2w48/d6w128 x 4/2 (CPU), S..XL/2 (GPU)")
    parser.add_argument(
        "--peer-presets",
        nargs="+",
        default=None,
        help="presets also run with diffusers (default: all on CPU, DiT-XL/2 on GPU)",
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
    parser.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK_FLOPS)
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip what would end after this many s (default 270 GPU, none CPU)"
    )
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is visible")
    args.presets = args.presets or (GRID if gpu else CPU_PRESETS)
    peers = set(args.peer_presets or (["DiT-XL/2"] if gpu else args.presets))
    sample_presets = args.sample_presets if args.sample_presets is not None else (["DiT-XL/2"] if gpu else [])
    args.modes = args.modes or (["eager", "compiled"] if gpu else ["eager"])
    args.input_size = args.input_size or (32 if gpu else 16)
    args.in_channels = args.in_channels or (4 if gpu else 3)
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (10 if gpu else 5)
    args.budget_s = args.budget_s if args.budget_s is not None else (270.0 if gpu else 0.0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)

    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.precision}, latents {args.in_channels}x{args.input_size}^2")
    print(
        f"{'kind':<6} {'mode':<14} {'preset':<11} {'batch':>5} {'Gflops':>8} {'dit_core':>12} {'diffusers':>12} "
        f"{'ratio':>6}" + ("   MFU ours / diffusers" if gpu else "")
    )
    results, skipped, took, start = [], [], {}, time.perf_counter()
    for kind, preset in plan_measurements(args.presets, peers, sample_presets):
        modes = [m for m in args.modes if kind == "train" or m != "compiled-model"]  # no loss in a sampling step
        expected = max(took.get(kind, [0.0]))  # as long as the longest measurement of this kind so far
        if args.budget_s and time.perf_counter() - start + expected > args.budget_s:
            skipped.append(f"{kind} {preset}")
            continue
        rows = bench(args, preset, kind, modes, preset in peers, device)
        took.setdefault(kind, []).append(rows[0]["seconds_incl_warmup"])
        for r in rows:
            print(row(r, gpu), flush=True)
        results += rows
        record = {"device": name, "torch": torch.__version__, "results": results, "skipped": skipped}
        out.write_text(json.dumps(record, indent=2))
    for r in results:
        syncs = f", host syncs in the step: {r['host_syncs']}" if "host_syncs" in r else ""
        print(f"{r['kind']} {r['mode']} {r['preset']}: attention runs {', '.join(r['attention_ops'])}{syncs}")
    for r in results:
        for key in ("speedup_vs_eager", "speedup_vs_compiled-model"):
            if key in r:
                base = key.removeprefix("speedup_vs_")
                print(f"{r['kind']} {r['preset']}: {r['mode']} / {base} = {r[key]:.2f}x (dit_core, same rounds)")
    if skipped:
        print(f"skipped to stay within --budget-s {args.budget_s:.0f}: {'; '.join(skipped)}")
    out.write_text(
        json.dumps({"device": name, "torch": torch.__version__, "results": results, "skipped": skipped}, indent=2)
    )
    print(
        f"ratio = dit_core / diffusers speed (median over {args.rounds} alternating rounds); "
        f"{time.perf_counter() - start:.0f} s in all; wrote {out}"
    )


if __name__ == "__main__":
    main()
