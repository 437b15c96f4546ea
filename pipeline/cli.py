"""The `ditscale` console script: one subcommand per stage, thin over the library code.

ditscale toy-data OUT [--classes 10 ...]                 the built-in toy images (ImageNet layout)
ditscale prepare SRC OUT [--set resolution=32 ...]      shards of latents (fields of PrepareConfig)
ditscale sweep|fid|analyze|run EXPERIMENT [--set ...]    the stages of a study (fields of ExperimentConfig)
ditscale status EXPERIMENT                              each trial's state, step, loss, FID; the time left
ditscale presets [--preset P ...] [--all-options]       the DiT presets with params and Gflops
ditscale demo [--seconds 60 | --steps N]                dit_core on its own: train, sample, score on the CPU
"""

from __future__ import annotations

import argparse
import sys


def _cmd_presets(args: argparse.Namespace) -> int:
    import itertools

    from dit_core.config import OPTION_CHOICES, PRESETS, DiTOptions, dit_config
    from dit_core.flops import gflops, param_count
    from pipeline.experiment_files import apply_overrides

    base = apply_overrides(DiTOptions(), args.set)
    names = [n for n in PRESETS if not args.preset or n in args.preset]
    if args.preset and len(names) != len(set(args.preset)):
        raise ValueError(f"unknown presets {sorted(set(args.preset) - set(names))}; see `ditscale presets`")
    if args.all_options:  # every combination of the block options, on each preset
        values = [*OPTION_CHOICES.values(), (False, True)]
        choices = [dict(zip([*OPTION_CHOICES, "qk_norm"], combo)) for combo in itertools.product(*values)]
    else:
        choices = [{}]
    print(
        f"{'preset':<13} {'positions':<9} {'mlp':<6} {'norm':<9} {'qk_norm':<7} {'depth':>5} {'width':>6} "
        f"{'heads':>5} {'tokens':>6} {'params':>14} {'Gflops':>9}"
    )
    for name in names:
        for choice in choices:
            options = DiTOptions(**{**vars(base), **choice})
            cfg = dit_config(name, options, input_size=args.input_size, in_channels=args.in_channels)
            print(
                f"{name:<13} {cfg.positions:<9} {cfg.mlp:<6} {cfg.norm:<9} {str(cfg.qk_norm).lower():<7} "
                f"{cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.num_tokens:>6} "
                f"{param_count(cfg):>14,} {gflops(cfg):>9.3f}"
            )
    return 0


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from pipeline.toy import ToyDataConfig, write_toy_dataset

    config = ToyDataConfig(
        num_classes=args.classes, per_class=args.per_class, resolution=args.resolution, seed=args.seed, style=args.style
    )
    summary = write_toy_dataset(args.out, config)
    print(f"toy data: {summary['num_images']} images of {summary['num_classes']} classes in {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.experiment_files import apply_overrides
    from pipeline.prepare import PrepareConfig, prepare

    manifest = prepare(args.src, args.out, apply_overrides(PrepareConfig(), args.set))
    return 0 if manifest.complete else 1


def _experiment(args: argparse.Namespace):
    from pipeline.experiment_files import load_experiment
    from pipeline.layout import resolve_workdir

    return load_experiment(args.experiment, args.set), resolve_workdir(args.workdir)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import main_sweep

    experiment, workdir = _experiment(args)
    return main_sweep(experiment, workdir, dry_run=args.dry_run)


def _cmd_fid(args: argparse.Namespace) -> int:
    from pipeline.fid.score import score_checkpoint
    from pipeline.fid.study import FidErrors, run_fid
    from pipeline.layout import Workspace
    from pipeline.manifest import Manifest

    experiment, workdir = _experiment(args)
    if args.checkpoint:
        manifest = Manifest.load(Workspace(workdir).path(experiment.data.shards))
        metrics, _, facts = score_checkpoint(args.checkpoint, manifest, experiment.fid, workdir, args.workers)
        print(f"{args.checkpoint}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        print("  " + "  ".join(f"{k}={v}" for k, v in facts.items()))
        return 0
    try:
        run_fid(experiment, workdir)
    except FidErrors as exc:
        print(f"ditscale fid: {exc}; the rest were scored: run the same command again to retry", file=sys.stderr)
        return 1
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pipeline.analyze import analyze_experiment

    experiment, workdir = _experiment(args)
    summary = analyze_experiment(experiment, workdir, args.step, args.out)
    logged = "" if summary["logged_to"] else " (no sweep run in MLflow to log them to)"
    print(f"figures, tables and fits: {summary['out']}{logged}")
    print(f"report: {summary['report']['html']} (and report.md beside it)")
    return 0 if "skipped" not in summary["fid_vs_gflops"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import run_all

    summary = run_all(*_experiment(args), args.step)
    return 1 if "error" in summary or summary["failed_trials"] or "fid_errors" in summary else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import study_status

    print(study_status(*_experiment(args)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dit_core.demo import run_demo

    result = run_demo(train_seconds=args.seconds, train_steps=args.steps, seed=args.seed)
    return 0 if result["passed"] else 1


EXPERIMENT_OVERRIDES = (
    "override fields, e.g. train.lr=3e-4 diffusion.prediction=x0 data.prepare.resolution=32 "
    "(several after one --set, or --set repeated)"
)


def _add_overrides(
    p: argparse.ArgumentParser, help: str = EXPERIMENT_OVERRIDES, metavar: str = "SECTION.FIELD=VALUE"
) -> None:
    """--set, repeatable: every value of every --set is kept, in order."""
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar=metavar, help=help)


def _add_workdir(p: argparse.ArgumentParser) -> None:
    """--workdir, for the subcommands that read or write a study's workspace."""
    p.add_argument("--workdir", default=None, help="workspace (default $DITSCALE_WORKDIR or ./ditscale-work)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditscale", description="DiT scaling studies on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("toy-data", help="write the built-in procedural toy dataset in ImageNet folder layout")
    p.add_argument("out", help="output folder (created; must be empty or an earlier toy-data folder)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (at most 10)")
    p.add_argument("--per-class", type=int, default=500, help="images per class")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="color", choices=["color", "simple"], help="coloured or plain grey shapes")
    p.set_defaults(func=_cmd_toy_data)

    p = sub.add_parser("prepare", help="shard an ImageNet-layout folder into WebDataset tars of latents (Ray)")
    p.add_argument("src", help="source folder: SRC/<class>/<image>.{jpg,png,webp,bmp}")
    p.add_argument("out", help="output folder or URI (s3://..., gs://...) for train-*.tar and manifest.json")
    _add_overrides(
        p,
        "PrepareConfig fields: resolution=256 codec.kind=vae|pixel codec.vae=ID_OR_FOLDER codec.space_to_depth=1 "
        "samples_per_shard=5000 seed=0 encode_batch_size=32 num_workers=0 verify=sha256|size",
        metavar="FIELD=VALUE",
    )
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("sweep", help="train a grid of DiT presets: Ray Tune x Ray Train, tracked in MLflow")
    p.add_argument("experiment", help="an experiment name (experiments/<name>.py) or a .json/.yaml file")
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="print the trials, their Gflops and training compute")
    _add_workdir(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("fid", help="score the EMA milestones of an experiment's trials (torch-fidelity, Ray)")
    p.add_argument("experiment", help="an experiment name or file (its fid section says how to score)")
    p.add_argument("--checkpoint", default=None, help="score this one checkpoint and print the result")
    p.add_argument("--workers", type=int, default=0, help="concurrent sampling tasks (0: from the experiment)")
    _add_overrides(p)
    _add_workdir(p)
    p.set_defaults(func=_cmd_fid)

    p = sub.add_parser("analyze", help="fit FID-vs-Gflops scaling laws and draw the paper's figures from MLflow")
    p.add_argument("experiment", help="an experiment name or file")
    p.add_argument(
        "--step", type=int, default=None, help="training step of the FID-vs-Gflops fit (default: last common)"
    )
    p.add_argument("--out", default=None, help="output folder (default <workdir>/analysis/<experiment>)")
    _add_overrides(p)
    _add_workdir(p)
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("run", help="the whole study: toy data/prepare, sweep, fid, analyze (each resumes)")
    p.add_argument("experiment", help="an experiment name (e.g. quickstart) or a .json/.yaml file")
    p.add_argument("--step", type=int, default=None, help="step of the FID-vs-Gflops fit (default: last common)")
    _add_overrides(p)
    _add_workdir(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="each trial's state, step, loss and FID, and the study's expected time left")
    p.add_argument("experiment", help="an experiment name or file")
    _add_overrides(p)
    _add_workdir(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("presets", help="list the DiT presets with parameter counts and Gflops")
    p.add_argument("--input-size", type=int, default=32, help="latent side in latent pixels (32 for 256 px + SD VAE)")
    p.add_argument("--in-channels", type=int, default=4, help="latent channels")
    p.add_argument(
        "--preset", action="extend", nargs="+", default=[], help="only these presets (e.g. DiT-XL/2 DiT-d2w48/4)"
    )
    _add_overrides(p, "model options (DiTOptions), e.g. mlp=swiglu", metavar="FIELD=VALUE")
    p.add_argument("--all-options", action="store_true", help="every combination of positions, mlp, norm, qk_norm")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("demo", help="train a tiny DiT on a synthetic distribution on the CPU and check its samples")
    p.add_argument("--seconds", type=float, default=60.0, help="training time budget in seconds")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead")
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
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted: run the same command again to resume"
        print(f"ditscale {args.command}: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
