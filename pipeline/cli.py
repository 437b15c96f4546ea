"""The `ditscale` console script: one subcommand per stage, thin over the library code.

ditscale presets [--input-size 32] [--in-channels 4]   the DiT presets with params and Gflops
ditscale demo [--seconds 60]                           dit_core on its own: train, sample, score on the CPU
"""

from __future__ import annotations

import argparse
import sys


def _cmd_presets(args: argparse.Namespace) -> int:
    from dit_core.flops import gflops, param_count
    from dit_core.model import PRESETS, dit_config

    print(f"{'preset':<10} {'depth':>5} {'width':>6} {'heads':>5} {'tokens':>6} {'params':>14} {'Gflops':>9}")
    for name in PRESETS:
        cfg = dit_config(name, input_size=args.input_size, in_channels=args.in_channels)
        print(
            f"{name:<10} {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.num_tokens:>6} "
            f"{param_count(cfg):>14,} {gflops(cfg):>9.3f}"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dit_core.demo import run_demo

    result = run_demo(train_seconds=args.seconds, seed=args.seed)
    return 0 if result["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditscale", description="DiT scaling studies on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the DiT presets with parameter counts and Gflops")
    p.add_argument("--input-size", type=int, default=32, help="latent side in latent pixels (32 for 256 px + SD VAE)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("demo", help="train a tiny DiT on a synthetic distribution on the CPU and check its samples")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"ditscale {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
