"""Typed experiment configuration: definitions, files, `--set` overrides, validation, trials with stable names.

An experiment is an `ExperimentConfig`. Named ones live in experiments/<name>.py as `EXPERIMENT`; a file (.json,
.yaml, .yml) holds a partial config, optionally `extends: <name>`, merged over the defaults or that experiment.
`--set train.lr=3e-4` overrides one field (values parsed as YAML: numbers, booleans, lists, null).

`expand_trials` turns the grid into trials. A trial's run name (e.g. `B_4-1c9e27d0`) is derived from everything that
shapes its training trajectory (model, objective, optimiser, batch, seed, data), so re-running the same sweep finds
the same runs, while changing the learning rate makes new ones. The step budget and the checkpoint/log intervals
are not part of the name (unless the learning-rate schedule depends on the step budget): raising `train.steps`
continues the existing runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dit_core.diffusion import DiffusionConfig
from dit_core.flops import H200_BF16_PEAK_FLOPS, gflops, param_count, training_compute
from dit_core.model import PRESETS, DiTConfig, dit_config, parse_preset
from dit_core.training import COMPILE_MODES

# ---------------------------------------------------------------------------------------------------------------
# The configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the training shards are and what they must contain; how `ditscale run` makes them if missing."""

    shards: str = "shards/imagenet256"  # train shard folder: relative to the workspace, absolute, or a URI
    val_shards: str | None = None  # held-out shard folder for val_loss; None: no validation loss
    resolution: int = 256  # image side the shards were made at, in pixels
    codec: str = "vae"  # codec the shards were made with: "vae" or "pixel"
    # How `ditscale run` builds the shards when they are missing:
    source: str | None = None  # image folder (ImageNet layout), or "toy" for the built-in toy data
    val_source: str | None = None  # image folder for val_shards ("toy" = toy data drawn with another seed)
    vae: str = "stabilityai/sd-vae-ft-ema"  # AutoencoderKL hub id or local folder (codec "vae")
    space_to_depth: int = 1  # pixel codec: fold f x f pixels into channels
    samples_per_shard: int = 5000  # images per shard
    toy_classes: int = 10  # toy data: number of classes
    toy_per_class: int = 500  # toy data: training images per class
    toy_val_per_class: int = 50  # toy data: validation images per class
    toy_style: str = "color"  # toy data: "color" or "simple"
    toy_seed: int = 0  # toy data: seed of the training images (validation uses toy_seed + 1)


@dataclass(frozen=True)
class GridConfig:
    """Which models: sizes x patch sizes, or an explicit list of presets."""

    sizes: tuple[str, ...] = ("S", "B", "L", "XL")  # model sizes (dit_core.model.SIZES)
    patch_sizes: tuple[int, ...] = (2, 4, 8)  # patch sizes in latent pixels
    presets: tuple[str, ...] = ()  # explicit preset names ("DiT-XL/2", ...); overrides sizes x patch_sizes
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    grad_checkpointing: bool = False  # recompute blocks in backward to save activation memory


@dataclass(frozen=True)
class TrainConfig:
    """The per-trial training recipe. Defaults are the paper's."""

    steps: int = 400_000  # optimizer steps per trial
    global_batch_size: int = 256  # images per step over all workers of a trial
    lr: float = 1e-4  # peak learning rate (AdamW)
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to min_lr_ratio * lr at the last step)
    warmup_steps: int = 0  # linear warm-up, in steps
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.9999  # EMA decay per step
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the paper)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
    prediction: str = "eps"  # what the model predicts: "eps", "x0" or "v"
    learn_sigma: bool = True  # learned variance (needs loss "hybrid")
    loss: str = "hybrid"  # "hybrid" (MSE + L_vlb) or "mse"
    noise_schedule: str = "linear"  # "linear" or "cosine"
    seed: int = 0  # seeds data order, noise and timesteps
    ckpt_every_steps: int = 10_000  # resumable checkpoint interval, in steps
    milestone_steps: tuple[int, ...] = (50_000, 100_000, 200_000, 300_000, 400_000)  # EMA kept for FID here
    keep_checkpoints: int = 2  # resumable checkpoints kept per trial (milestones are kept apart from these)
    log_every_steps: int = 100  # metrics interval, in steps
    val_every_steps: int = 5_000  # validation-loss interval, in steps (needs data.val_shards)
    val_batches: int = 4  # validation batches (of the per-worker batch size) per evaluation
    loader_workers: int = 2  # DataLoader worker processes per training worker
    peak_tflops: float = 0.0  # accelerator peak for MFU (bf16 dense); 0 = 790 on GPU, MFU not logged on CPU

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(
            schedule=self.noise_schedule, prediction=self.prediction, learn_sigma=self.learn_sigma, loss=self.loss
        )


@dataclass(frozen=True)
class ResourcesConfig:
    """What each trial asks of the Ray cluster."""

    workers_per_trial: int = 8  # DDP workers (processes) per trial
    gpus_per_worker: float = 1.0  # 0 trains on CPUs
    cpus_per_worker: float = 4.0  # CPUs reserved per worker (data loading + host work)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's free resources allow
    max_failures: int = 3  # worker-group restarts per trial (from the latest checkpoint) before it fails


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    experiment_name: str = ""  # MLflow experiment; "" = the experiment's name
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else an embedded server over <workdir>/mlflow.db


@dataclass(frozen=True)
class FidConfig:
    """How the fid stage scores EMA checkpoints (dit_facts.md section 4 for the paper's protocol)."""

    num_samples: int = 50_000  # generated images per scored checkpoint (FID-50K)
    sampler: str = "ddpm"  # "ddpm" (learned variance, the paper), "ddim", or a diffusers scheduler class name
    sampling_steps: int = 250  # reverse steps (the paper: 250 DDPM steps)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1.0 = none, the scaling study)
    guidance_channels: int = 0  # latent channels guided; 0 = all, 3 = the official sampler
    labels: str = "uniform"  # "uniform" random labels (the paper) or "balanced" (equal count per class)
    extractor: str = "inception-v3-compat"  # torch-fidelity extractor; "ditscale-classifier" needs no download
    extractor_weights: str = ""  # local Inception weights file (air-gapped clusters); "" = torch-fidelity's URL
    classifier_seconds: float = 30.0  # training budget of the ditscale-classifier extractor (machine-dependent)
    classifier_steps: int = 0  # > 0: train it for exactly this many steps instead (the same extractor everywhere)
    metrics: tuple[str, ...] = ("fid",)  # add "isc", "kid", "prc" on request
    reference_npz: str = ""  # ADM reference batch (.npz with mu, sigma) instead of statistics of the real images
    reference_images: int = 0  # real images behind the reference statistics; 0 = all
    slice_size: int = 250  # images per actor call; each slice has its own seed, so results do not depend on workers
    batch_size: int = 250  # images per network evaluation batch
    compile: bool | None = None  # torch.compile the DiT for sampling; None (null) = on GPU, not on CPU
    workers: int = 0  # sampling actors; 0 = one per GPU, or one per CPU
    seed: int = 0
    save_npz: bool = False  # also keep the samples as an ADM-evaluator .npz (arr_0, uint8 NHWC)


@dataclass(frozen=True)
class ExperimentConfig:
    """One scaling study."""

    name: str = "experiment"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fid: FidConfig = field(default_factory=FidConfig)

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking.experiment_name or self.name


# ---------------------------------------------------------------------------------------------------------------
# Loading: by name, from a file, with overrides
# ---------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A malformed or invalid experiment; the message says what to change."""


def available_experiments() -> list[str]:
    folder = Path(__file__).resolve().parents[1] / "experiments"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_experiment(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An experiment by name (experiments/<name>.py) or file path, with `section.field=value` overrides applied."""
    if Path(name_or_path).suffix in (".json", ".yaml", ".yml"):
        config = _from_file(Path(name_or_path))
    elif name_or_path in available_experiments():
        module = importlib.import_module(f"experiments.{name_or_path}")
        config = module.EXPERIMENT
    else:
        raise ConfigError(
            f"unknown experiment {name_or_path!r}: give one of {', '.join(available_experiments())} "
            f"or a .json/.yaml file"
        )
    return apply_overrides(config, overrides)


def _from_file(path: Path) -> ExperimentConfig:
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse experiment file {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment file {path} must hold a mapping of sections, got {type(raw).__name__}")
    base_name = raw.pop("extends", None)
    base = load_experiment(base_name) if base_name else ExperimentConfig(name=path.stem)
    return _merge(base, raw, where=str(path))


def _merge(config: Any, values: dict[str, Any], where: str, path: str = "") -> Any:
    """A copy of dataclass `config` with `values` (a nested dict) applied, type-checked field by field."""
    known = {f.name: f for f in fields(config)}
    changes = {}
    for key, value in values.items():
        name = f"{path}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown field {name!r} ({type(config).__name__} has: {', '.join(known)})")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {name} must be a mapping of fields, got {value!r}")
            changes[key] = _merge(current, value, where, f"{name}.")
        else:
            hint = typing.get_type_hints(type(config))[key]
            changes[key] = _coerce(value, hint, f"{where}: {name}")
    return replace(config, **changes)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a field's type hint, turning lists into tuples and ints into floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} values, got {len(value)}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, item_types))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def apply_overrides(config: ExperimentConfig, overrides: list[str] | tuple[str, ...]) -> ExperimentConfig:
    """Apply `section.field=value` strings (values parsed as YAML)."""
    import yaml

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse {text!r}: {exc}") from exc
        if isinstance(value, str) and _looks_numeric(text):
            value = float(text)  # YAML reads "3e-4" as a string
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        config = _merge(config, nested, where="--set")
    return config


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------------------------------------------


def resolve_workdir(workdir: str | None = None) -> str:
    """--workdir, else DITSCALE_WORKDIR, else ./ditscale-work; local paths made absolute."""
    chosen = workdir or os.environ.get("DITSCALE_WORKDIR") or "ditscale-work"
    return chosen if "://" in chosen else str(Path(chosen).resolve())


def resolve_path(workdir: str, path: str) -> str:
    """A path from a config: URIs and absolute paths as they are, others under the workspace."""
    if "://" in path or Path(path).is_absolute():
        return path
    return f"{workdir.rstrip('/')}/{path}"


# ---------------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One grid point: a model preset trained with the experiment's recipe."""

    preset: str
    model: DiTConfig
    run_name: str  # stable: same config -> same name -> same storage folder and MLflow run

    @property
    def size(self) -> str:
        return parse_preset(self.preset)[0]

    @property
    def patch(self) -> int:
        return parse_preset(self.preset)[1]

    @property
    def gflops(self) -> float:
        return gflops(self.model)

    @property
    def params(self) -> int:
        return param_count(self.model, include_pos_embed=False)


def grid_presets(grid: GridConfig) -> list[str]:
    if grid.presets:
        return list(grid.presets)
    return [f"DiT-{size}/{patch}" for size in grid.sizes for patch in grid.patch_sizes]


def trajectory_identity(config: ExperimentConfig, model: DiTConfig, data_identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that shapes a trial's training trajectory (hashed into its run name)."""
    train = config_to_dict(config.train)
    for runtime in ("ckpt_every_steps", "milestone_steps", "keep_checkpoints", "log_every_steps", "val_every_steps",
                    "val_batches", "loader_workers", "peak_tflops", "compile", "compile_mode"):  # fmt: skip
        train.pop(runtime)
    if config.train.lr_schedule == "constant":
        train.pop("steps")  # more steps continue the same run
    model_dict = config_to_dict(model)
    model_dict.pop("grad_checkpointing")
    return {"model": model_dict, "train": train, "data": data_identity,
            "workers": config.resources.workers_per_trial}  # fmt: skip


def run_name(preset: str, identity: dict[str, Any]) -> str:
    size, patch = parse_preset(preset)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{size}_{patch}-{digest}"


def expand_trials(config: ExperimentConfig, manifest: dict[str, Any]) -> list[Trial]:
    """The trials of an experiment for shards described by `manifest` (latent shape, classes)."""
    channels, height, _ = manifest["latent_shape"]
    data_identity = {
        "listing_sha256": manifest["source"]["listing_sha256"],
        "codec": manifest["codec"],
        "resolution": manifest["resolution"],
    }
    trials = []
    for preset in grid_presets(config.grid):
        model = dit_config(
            preset,
            input_size=height,
            in_channels=channels,
            num_classes=manifest["num_classes"],
            learn_sigma=config.train.learn_sigma,
            class_dropout_prob=config.grid.class_dropout_prob,
            grad_checkpointing=config.grid.grad_checkpointing,
        )
        trials.append(Trial(preset, model, run_name(preset, trajectory_identity(config, model, data_identity))))
    return trials


# ---------------------------------------------------------------------------------------------------------------
# Validation (before any trial starts)
# ---------------------------------------------------------------------------------------------------------------


def validate_experiment(config: ExperimentConfig) -> None:
    """Checks that need no data; raise ConfigError naming the field and the fix."""
    t, r, g = config.train, config.resources, config.grid
    presets = grid_presets(g)
    if not presets:
        raise ConfigError("the grid is empty: set grid.sizes and grid.patch_sizes, or grid.presets")
    for preset in presets:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} in the grid; known presets: {', '.join(PRESETS)}")
    if len(set(presets)) != len(presets):
        raise ConfigError(f"the grid lists a preset twice: {presets}")
    positive = {"train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
                "train.ckpt_every_steps": t.ckpt_every_steps, "train.log_every_steps": t.log_every_steps,
                "resources.workers_per_trial": r.workers_per_trial}  # fmt: skip
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if t.global_batch_size % r.workers_per_trial:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by resources.workers_per_trial "
            f"{r.workers_per_trial}: every worker needs the same batch; change one of them"
        )
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {t.lr_schedule!r}")
    if t.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision must be 'auto', 'bf16' or 'fp32', got {t.precision!r}")
    if not 0 <= t.ema_decay <= 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1], got {t.ema_decay}")
    late = [m for m in t.milestone_steps if not 0 < m <= t.steps]
    if late:
        raise ConfigError(f"train.milestone_steps {late} lie outside 1..train.steps ({t.steps})")
    try:
        t.diffusion_config().validate()
    except ValueError as exc:
        raise ConfigError(f"train objective: {exc}") from None
    if config.data.codec not in ("vae", "pixel"):
        raise ConfigError(f"data.codec must be 'vae' or 'pixel', got {config.data.codec!r}")
    if r.gpus_per_worker < 0 or r.cpus_per_worker <= 0:
        raise ConfigError("resources.gpus_per_worker must be >= 0 and resources.cpus_per_worker > 0")
    f = config.fid
    if f.num_samples < 2 or f.slice_size < 1 or f.batch_size < 1 or f.sampling_steps < 1:
        raise ConfigError("fid.num_samples must be >= 2 and fid.slice_size, batch_size, sampling_steps >= 1")
    if f.labels not in ("uniform", "balanced"):
        raise ConfigError(f"fid.labels must be 'uniform' or 'balanced', got {f.labels!r}")
    if f.classifier_steps < 0 or (f.classifier_steps == 0 and f.classifier_seconds <= 0):
        raise ConfigError("the classifier extractor needs fid.classifier_steps > 0 or fid.classifier_seconds > 0")
    unknown = set(f.metrics) - {"fid", "isc", "kid", "prc"}
    if unknown or "fid" not in f.metrics:
        raise ConfigError(f"fid.metrics must include 'fid' and only 'fid', 'isc', 'kid', 'prc'; got {f.metrics}")


def validate_against_data(config: ExperimentConfig, manifest: dict[str, Any], shards: str) -> None:
    """Checks that need the shards' manifest: codec, resolution, latent size vs patch sizes, batch vs data."""
    if manifest["codec"]["kind"] != config.data.codec:
        raise ConfigError(
            f"shards in {shards} were made with the {manifest['codec']['kind']!r} codec but the experiment expects "
            f"{config.data.codec!r}: set data.codec={manifest['codec']['kind']} or point data.shards elsewhere"
        )
    if manifest["resolution"] != config.data.resolution:
        raise ConfigError(
            f"shards in {shards} are at {manifest['resolution']} px but the experiment expects "
            f"{config.data.resolution} px: set data.resolution={manifest['resolution']} or prepare shards at "
            f"{config.data.resolution} px"
        )
    latent = manifest["latent_shape"][1]
    for preset in grid_presets(config.grid):
        patch = parse_preset(preset)[1]
        if latent % patch:
            raise ConfigError(
                f"{preset}: patch size {patch} does not divide the {latent}x{latent} latents of {shards}; "
                f"drop it from the grid or use another resolution"
            )
    if manifest["total"] < config.train.global_batch_size:
        raise ConfigError(
            f"{shards} holds {manifest['total']} samples, fewer than one global batch "
            f"({config.train.global_batch_size}): lower train.global_batch_size"
        )


def describe_trials(config: ExperimentConfig, trials: list[Trial], mfu: float = 0.4) -> str:
    """The dry-run table: one row per trial with params, Gflops, training compute and, for GPU runs, the expected
    accelerator-hours of training and of FID sampling at `mfu` of train.peak_tflops (0 = the H200's 790)."""
    t, f = config.train, config.fid
    gpu = config.resources.gpus_per_worker > 0
    peak = (t.peak_tflops or H200_BF16_PEAK_FLOPS / 1e12) * 1e12
    cost = f"{'train GPU-h':>12} {'FID GPU-h':>10}" if gpu else ""
    lines = [
        f"experiment {config.name}: {len(trials)} trials x {t.steps:,} steps at global batch {t.global_batch_size} "
        f"on {config.resources.workers_per_trial} worker(s) each",
        f"{'run':<16} {'preset':<10} {'params':>12} {'Gflops':>9} {'tokens':>6} {'train PFLOP':>12} "
        f"{'paper GMACs':>12} {cost}".rstrip(),
    ]
    total, hours = 0.0, [0.0, 0.0]
    for trial in trials:
        compute = training_compute(trial.model, t.global_batch_size, t.steps)
        total += compute["flops"]
        row = (
            f"{trial.run_name:<16} {trial.preset:<10} {trial.params:>12,} {trial.gflops:>9.4g} "
            f"{trial.model.num_tokens:>6} {compute['flops'] / 1e15:>12.4g} {compute['paper_gflops']:>12.4g}"
        )
        if gpu:
            evaluations = f.num_samples * f.sampling_steps * len(t.milestone_steps) * (2 if f.cfg_scale != 1 else 1)
            train_h = compute["flops"] / (mfu * peak) / 3600
            fid_h = evaluations * 2e9 * trial.gflops / (mfu * peak) / 3600
            hours[0], hours[1] = hours[0] + train_h, hours[1] + fid_h
            row += f" {train_h:>12.3g} {fid_h:>10.3g}"
        lines.append(row)
    lines.append(f"total training compute: {total / 1e15:.4g} PFLOP ({total / 8.64e19:.4g} PF-days; 6 x MACs)")
    if gpu:
        lines.append(f"expected cost at {mfu:.0%} MFU of {peak / 1e12:.0f} TFLOP/s: {hours[0]:,.1f} GPU-hours of "
                     f"training + {hours[1]:,.1f} of FID sampling ({f.num_samples:,} samples x {f.sampling_steps} "
                     f"steps x {len(t.milestone_steps)} milestones); the peers measured 16-50% MFU on an H200, "
                     f"small models at the low end")  # fmt: skip
    return "\n".join(lines)
