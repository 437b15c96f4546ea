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


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from pipeline.toy import ToyDataConfig, write_toy_dataset

    config = ToyDataConfig(
        num_classes=args.classes, per_class=args.per_class, resolution=args.resolution, seed=args.seed, style=args.style
    )
    summary = write_toy_dataset(args.out, config)
    print(f"toy data: {summary['num_images']} images of {summary['num_classes']} classes in {args.out}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.codecs import CodecConfig
    from pipeline.prepare import PrepareConfig, prepare

    config = PrepareConfig(
        resolution=args.resolution,
        codec=CodecConfig(
            kind=args.codec,
            vae=args.vae,
            vae_revision=args.vae_revision,
            vae_subfolder=args.vae_subfolder,
            space_to_depth=args.space_to_depth,
        ),
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        encode_batch_size=args.batch_size,
        num_workers=args.workers,
        verify=args.verify,
    )
    manifest = prepare(args.src, args.out, config)
    return 0 if manifest["complete"] else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.config import load_experiment, resolve_workdir
    from pipeline.sweep import main_sweep

    experiment = load_experiment(args.experiment, args.set)
    return main_sweep(experiment, resolve_workdir(args.workdir), dry_run=args.dry_run)


def _cmd_fid(args: argparse.Namespace) -> int:
    from pipeline.config import load_experiment, resolve_workdir
    from pipeline.data import load_manifest
    from pipeline.fid import run_fid, score_checkpoint

    experiment = load_experiment(args.experiment, args.set)
    workdir = resolve_workdir(args.workdir)
    if args.checkpoint:
        from pipeline.config import resolve_path

        manifest = load_manifest(resolve_path(workdir, experiment.data.shards))
        metrics, _, facts = score_checkpoint(args.checkpoint, manifest, experiment.fid, workdir, args.workers)
        print(f"{args.checkpoint}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        print("  " + "  ".join(f"{k}={v}" for k, v in facts.items()))
        return 0
    run_fid(experiment, workdir)
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.report import analyze
    from pipeline import tracking
    from pipeline.config import load_experiment, resolve_workdir

    experiment = load_experiment(args.experiment, args.set)
    workdir = resolve_workdir(args.workdir)
    out = args.out or f"{workdir}/analysis/{experiment.name}"
    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        parent = tracking.find_run(uri, exp_id, {tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP: experiment.name})
        summary = analyze(
            uri, experiment.mlflow_experiment, out, args.step, parent.info.run_id if parent else None,
            paper_grid=experiment.name == "paper_grid", sweep=experiment.name,
        )  # fmt: skip
    print(f"figures, tables and fits: {out}" + ("" if parent else " (no sweep run in MLflow to log them to)"))
    return 0 if "skipped" not in summary["fid_vs_gflops"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_experiment, resolve_workdir
    from pipeline.run import run_all

    summary = run_all(load_experiment(args.experiment, args.set), resolve_workdir(args.workdir), args.step)
    return 1 if "error" in summary else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from dit_core.demo import run_demo

    result = run_demo(train_seconds=args.seconds, seed=args.seed)
    return 0 if result["passed"] else 1


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override fields (several after one --set, or --set repeated)")  # fmt: skip


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

    from pipeline.codecs import DEFAULT_VAE

    p = sub.add_parser("prepare", help="shard an ImageNet-layout folder into WebDataset tars of latents (Ray)")
    p.add_argument("src", help="source folder: SRC/<class>/<image>.{jpg,png,webp,bmp}")
    p.add_argument("out", help="output folder or URI (s3://..., gs://...) for train-*.tar and manifest.json")
    p.add_argument("--codec", default="vae", choices=["vae", "pixel"], help="AutoencoderKL latents or raw pixels")
    p.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder (save_pretrained)")
    p.add_argument("--vae-revision", default=None, help="hub revision of the VAE")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of the VAE inside a pipeline folder, e.g. vae")
    p.add_argument("--space-to-depth", type=int, default=1, help="pixel codec: fold f x f pixels into channels")
    p.add_argument("--resolution", type=int, default=256, help="image side after the ADM center crop")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes classes across shards")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--workers", type=int, default=0, help="encoding actors (0: one per GPU, else one per CPU)")
    p.add_argument("--verify", default="sha256", choices=["sha256", "size"], help="how a re-run checks old shards")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("sweep", help="train a grid of DiT presets: Ray Tune x Ray Train, tracked in MLflow")
    p.add_argument("experiment", help="an experiment name (experiments/<name>.py) or a .json/.yaml file")
    _add_overrides(p)
    p.add_argument("--dry-run", action="store_true", help="print the trials, their Gflops and training compute")
    p.add_argument("--workdir", default=None, help="workspace (default $DITSCALE_WORKDIR or ./ditscale-work)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("fid", help="score the EMA milestones of an experiment's trials (torch-fidelity, Ray)")
    p.add_argument("experiment", help="an experiment name or file (its fid section says how to score)")
    p.add_argument("--checkpoint", default=None, help="score this one checkpoint and print the result")
    p.add_argument("--workers", type=int, default=0, help="concurrent sampling tasks (0: from the experiment)")
    _add_overrides(p)
    p.add_argument("--workdir", default=None, help="workspace (default $DITSCALE_WORKDIR or ./ditscale-work)")
    p.set_defaults(func=_cmd_fid)

    p = sub.add_parser("analyze", help="fit FID-vs-Gflops scaling laws and draw the paper's figures from MLflow")
    p.add_argument("experiment", help="an experiment name or file")
    p.add_argument(
        "--step", type=int, default=None, help="training step of the FID-vs-Gflops fit (default: last common)"
    )
    p.add_argument("--out", default=None, help="output folder (default <workdir>/analysis/<experiment>)")
    _add_overrides(p)
    p.add_argument("--workdir", default=None, help="workspace (default $DITSCALE_WORKDIR or ./ditscale-work)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("run", help="the whole study: toy data/prepare, sweep, fid, analyze (each resumes)")
    p.add_argument("experiment", help="an experiment name (e.g. quickstart) or a .json/.yaml file")
    p.add_argument("--step", type=int, default=None, help="step of the FID-vs-Gflops fit (default: last common)")
    _add_overrides(p)
    p.add_argument("--workdir", default=None, help="workspace (default $DITSCALE_WORKDIR or ./ditscale-work)")
    p.set_defaults(func=_cmd_run)

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
