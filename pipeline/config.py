"""The experiment: one typed, frozen `ExperimentConfig` that nests each owner's own config, validated when built.

    name, description
    data        shard folders, where `ditscale run` makes them from; data.prepare (PrepareConfig: resolution,
                data.prepare.codec (CodecConfig), shard size), data.toy (ToyDataConfig) for the built-in toy data
    grid        which trials: sizes x patch sizes (or a list of presets) x design axes, per variant
    model       dit_core's DiTOptions: design options shared by every trial (mlp_ratio, label dropout, ...)
    diffusion   dit_core's DiffusionConfig: schedule, prediction target, learned variance, loss
    train       the optimisation recipe and its intervals
    resources   what each trial asks of the Ray cluster
    tracking    MLflow
    fid         how the fid stage scores EMA checkpoints
    analysis    what the analysis draws beside the results

Every field is declared once, by its owner; each section checks itself in `__post_init__` and the experiment checks
what spans sections, so an invalid experiment never exists. Named experiments live in experiments/<name>.py as
`EXPERIMENT`; pipeline/experiment_files.py loads files and `--set` overrides.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from analysis.config import AnalysisConfig
from dit_core.config import PRESETS, DiTOptions, parse_preset
from dit_core.diffusion import DiffusionConfig
from dit_core.samplers import FlowSampler
from dit_core.training import COMPILE_MODES
from pipeline.prepare import PrepareConfig
from pipeline.toy import ToyDataConfig

FLOW_SAMPLERS = FlowSampler.METHODS


class ConfigError(ValueError):
    """A malformed or invalid experiment; the message says what to change."""


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Where the training shards are and how `ditscale run` makes them when they are missing."""

    shards: str = "shards/imagenet256"  # train shard folder: relative to the workspace, absolute, or a URI
    val_shards: str | None = None  # held-out shard folder for val_loss; None: no validation loss
    source: str | None = None  # image folder (ImageNet layout) to prepare data.shards from, or "toy"
    val_source: str | None = None  # image folder for val_shards ("toy" = toy data drawn with data.toy.seed + 1)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)  # what the shards hold (and are checked for)
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)  # the toy images, when a source is "toy"
    toy_val_per_class: int = 50  # toy validation images per class

    def __post_init__(self) -> None:
        if self.toy_val_per_class < 1:
            raise ConfigError(f"data.toy_val_per_class must be >= 1, got {self.toy_val_per_class}")
        if "toy" in (self.source, self.val_source) and self.toy.resolution < self.prepare.resolution:
            raise ConfigError(
                f"data.toy.resolution {self.toy.resolution} is below data.prepare.resolution "
                f"{self.prepare.resolution}: the toy images would be upscaled; draw them at "
                f"data.toy.resolution={self.prepare.resolution} (or more)"
            )


# The sections a grid axis or a variant may set: what shapes a training run, and how the fid stage samples it.
AXIS_SECTIONS = ("model", "diffusion", "train")
AXIS_FID_FIELDS = ("sampler", "sampling_steps", "cfg_scale", "guidance_channels", "guidance_interval")


def _check_axis_path(path: str, where: str) -> None:
    section, _, rest = path.partition(".")
    fid_ok = section == "fid" and rest in AXIS_FID_FIELDS
    if not rest or (section not in AXIS_SECTIONS and not fid_ok):
        raise ConfigError(
            f"{where}: {path!r} cannot vary between trials; an axis or a variant sets fields of "
            f"{', '.join(s + '.*' for s in AXIS_SECTIONS)} or fid.{{{', '.join(AXIS_FID_FIELDS)}}}"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'mlp': 'swiglu'}, 'train.lr': 1e-3} -> {'model.mlp': 'swiglu', 'train.lr': 1e-3}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class GridConfig:
    """Which trials: model sizes x patch sizes (or a list of presets) x design axes, for each variant.

    `axes` sweep config fields next to the models, `{"model.mlp": ["gelu", "swiglu"]}`: every combination of their
    values is a trial of every preset. `variants` are named bundles of fields set together, `{"modern":
    {"model.mlp": "swiglu", "diffusion.objective": "flow", ...}}`: each preset is trained once per variant (and
    per axis combination). Both are checked against the experiment's fields when it is built.
    """

    sizes: tuple[str, ...] = ("S", "B", "L", "XL")  # model sizes (dit_core.model.SIZES)
    patch_sizes: tuple[int, ...] = (2, 4, 8)  # patch sizes in latent pixels
    presets: tuple[str, ...] = ()  # explicit preset names ("DiT-XL/2", ...); overrides sizes x patch_sizes
    axes: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # config path -> the values it takes
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant name -> {config path: value}
    seeds: tuple[int, ...] = ()  # replicates: every trial once per training seed (train.seed); () = train.seed alone

    def __post_init__(self) -> None:
        if len(set(self.seeds)) != len(self.seeds) or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ConfigError(f"grid.seeds must be distinct non-negative integers, got {list(self.seeds)}")
        # nested or dotted spellings ({"model": {"mlp": [...]}} or {"model.mlp": [...]}) become dotted paths
        axes = {path: tuple(v) if isinstance(v, list) else v for path, v in flatten(dict(self.axes)).items()}
        object.__setattr__(self, "axes", axes)
        variants = {name: flatten(v) if isinstance(v, dict) else v for name, v in dict(self.variants).items()}
        object.__setattr__(self, "variants", variants)
        for path, values in self.axes.items():
            _check_axis_path(path, "grid.axes")
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"grid.axes: {path} needs a non-empty list of values, got {values!r}")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ConfigError(f"grid.axes: {path} lists a value twice: {list(values)}")
        for name, settings in self.variants.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)):
                raise ConfigError(f"grid.variants: name {name!r} must be letters, digits, '_', '-' or '.'")
            if not isinstance(settings, dict):
                raise ConfigError(f"grid.variants: {name} must map config paths to values, got {settings!r}")
            for path in flatten(settings):
                _check_axis_path(path, f"grid.variants.{name}")
                if path in self.axes:
                    raise ConfigError(f"grid.variants.{name} sets {path}, which grid.axes sweeps: keep one of them")
        if self.seeds and ("train.seed" in self.axes or any("train.seed" in v for v in self.variants.values())):
            raise ConfigError("grid.seeds sets train.seed for every trial: drop train.seed from grid.axes and variants")
        names = self.preset_names()
        if not names:
            raise ConfigError("the grid is empty: set grid.sizes and grid.patch_sizes, or grid.presets")
        for name in names:
            if name not in PRESETS:
                try:
                    parse_preset(name)  # names the new name of a renamed size
                except ValueError as exc:
                    raise ConfigError(f"grid: {exc}") from None
        if len(set(names)) != len(names):
            raise ConfigError(f"the grid lists a preset twice: {names}")

    def preset_names(self) -> list[str]:
        if self.presets:
            return list(self.presets)
        return [f"DiT-{size}/{patch}" for size in self.sizes for patch in self.patch_sizes]


@dataclass(frozen=True)
class TrainConfig:
    """The per-trial training recipe. Defaults are the paper's."""

    # Fields that do not change the trajectory: left out of run names, so changing them continues the same runs.
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = (
        "ckpt_every_steps", "milestone_steps", "keep_checkpoints", "log_every_steps", "val_every_steps",
        "val_batches", "loader_workers", "peak_tflops", "compile", "compile_mode",
    )  # fmt: skip

    steps: int = 400_000  # optimizer steps per trial
    global_batch_size: int = 256  # images per step over all workers of a trial
    lr: float = 1e-4  # peak learning rate (AdamW)
    lr_schedule: str = "constant"  # "constant" or "cosine" (decay to min_lr_ratio * lr at the last step)
    warmup_steps: int = 0  # linear warm-up, in steps
    min_lr_ratio: float = 0.1  # cosine schedule floor, as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float = 0.9999  # EMA decay per step: the EMA whose milestones give the metric `fid`
    ema_decays: tuple[float, ...] = ()  # further EMA decays kept beside it, each saved at the milestones and scored
    # (metrics `ema<decay>/fid`, ...): the best EMA length depends on model size (EDM2)
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the paper)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    compile: bool = False  # torch.compile the model, and apart from it the noising and the loss
    compile_mode: str = "default"  # torch.compile mode: "default", "reduce-overhead" (CUDA graphs), "max-autotune", ...
    seed: int = 0  # seeds the initial weights, data order, noise and timesteps
    ckpt_every_steps: int = 10_000  # resumable checkpoint interval, in steps
    milestone_steps: tuple[int, ...] = (50_000, 100_000, 200_000, 300_000, 400_000)  # EMA kept for FID here
    keep_checkpoints: int = 2  # resumable checkpoints kept per trial (milestones are kept apart from these)
    log_every_steps: int = 100  # metrics interval, in steps
    val_every_steps: int = 5_000  # validation-loss interval, in steps (needs data.val_shards)
    val_batches: int = 4  # validation batches (of the per-worker batch size) per evaluation
    loader_workers: int = 2  # DataLoader worker processes per training worker
    peak_tflops: float = 0.0  # one device's peak for the `mfu` metric, TFLOP/s (dense bf16); 0 = the GPU's datasheet
    # figure, looked up by its name (dit_core.flops.DEVICE_PEAKS; no `mfu` for an unlisted GPU, or on CPUs)

    def __post_init__(self) -> None:
        _positive(
            "train",
            steps=self.steps,
            global_batch_size=self.global_batch_size,
            lr=self.lr,
            ckpt_every_steps=self.ckpt_every_steps,
            log_every_steps=self.log_every_steps,
            val_every_steps=self.val_every_steps,
            val_batches=self.val_batches,
            keep_checkpoints=self.keep_checkpoints,
        )
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.compile_mode not in COMPILE_MODES:
            modes = ", ".join(COMPILE_MODES)
            raise ConfigError(f"train.compile_mode must be one of {modes}, got {self.compile_mode!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not 0 <= self.ema_decay <= 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1], got {self.ema_decay}")
        if any(not 0 <= d <= 1 for d in self.ema_decays) or len({self.ema_decay, *self.ema_decays}) != (
            1 + len(self.ema_decays)
        ):
            raise ConfigError(
                f"train.ema_decays must be distinct decays in [0, 1] other than train.ema_decay ({self.ema_decay}), "
                f"got {list(self.ema_decays)}"
            )
        if self.warmup_steps < 0 or self.loader_workers < 0 or self.grad_clip < 0 or self.peak_tflops < 0:
            raise ConfigError(
                "train.warmup_steps, train.loader_workers, train.grad_clip and train.peak_tflops must be >= 0"
            )
        late = [m for m in self.milestone_steps if not 0 < m <= self.steps]
        if late:
            raise ConfigError(f"train.milestone_steps {late} lie outside 1..train.steps ({self.steps})")


@dataclass(frozen=True)
class ResourcesConfig:
    """What each trial asks of the Ray cluster."""

    workers_per_trial: int = 8  # DDP workers (processes) per trial
    gpus_per_worker: float = 1.0  # 1: one GPU per DDP worker; 0: train on CPUs (nothing else works)
    cpus_per_worker: float = 4.0  # CPUs reserved per worker (data loading + host work)
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's free resources allow
    max_failures: int = 3  # worker-group restarts per trial (from the latest checkpoint) before it fails

    def __post_init__(self) -> None:
        _positive("resources", workers_per_trial=self.workers_per_trial, cpus_per_worker=self.cpus_per_worker)
        if self.max_concurrent_trials < 0 or self.max_failures < 0:
            raise ConfigError("resources.max_concurrent_trials and max_failures must be >= 0")
        if self.gpus_per_worker not in (0, 1):
            raise ConfigError(
                f"resources.gpus_per_worker must be 1 (one GPU per DDP worker) or 0 (train on CPUs), got "
                f"{self.gpus_per_worker}: a fraction puts two DDP ranks on one GPU (NCCL stops: 'Duplicate GPU "
                f"detected') and more than 1 holds GPUs a worker never uses; for more GPUs per trial raise "
                f"resources.workers_per_trial"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow."""

    experiment_name: str = ""  # MLflow experiment; "" = the experiment's name
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else an embedded server over <workdir>/mlflow.db


FID_METRICS = ("fid", "isc", "kid", "prc", "fd_dinov2")
FID_SCHEDULES = ("spare", "between", "after")  # when `ditscale run` scores milestones (FidConfig.schedule)
DINOV2_EXTRACTORS = {"dinov2-vit-s-14": 384, "dinov2-vit-b-14": 768, "dinov2-vit-l-14": 1024, "dinov2-vit-g-14": 1536}


@dataclass(frozen=True)
class FidConfig:
    """How the fid stage scores EMA checkpoints. Defaults are the paper's protocol: FID-50K, 250 DDPM steps with
    the learned variance, no guidance, labels drawn uniformly at random."""

    num_samples: int = 50_000  # generated images per scored checkpoint (FID-50K)
    sampler: str = "ddpm"  # DDPM objective: "ddpm" (learned variance, the paper), "ddim", or a diffusers scheduler
    # class name; flow objective: "euler" or "heun" (ODE), "sde" (SiT's Euler-Maruyama)
    sampling_steps: int = 250  # reverse steps (the paper: 250 DDPM steps); ODE/SDE steps for a flow
    cfg_scale: float = 1.0  # classifier-free guidance scale (1.0 = none, the scaling study)
    guidance_channels: int = 0  # latent channels guided; 0 = all, 3 = the official sampler
    guidance_interval: tuple[float, ...] = ()  # (lo, hi): guide only at noise levels t/T in [lo, hi]; () = always
    labels: str = "uniform"  # "uniform" random labels (the paper) or "balanced" (equal count per class)
    extractor: str = "inception-v3-compat"  # torch-fidelity extractor; "ditscale-classifier" needs no download
    extractor_weights: str = ""  # local Inception weights file (air-gapped clusters); "" = torch-fidelity's URL
    classifier_seconds: float = 30.0  # training budget of the ditscale-classifier extractor (machine-dependent)
    classifier_steps: int = 0  # > 0: train it for exactly this many steps instead (the same extractor everywhere)
    metrics: tuple[str, ...] = ("fid",)  # add "isc", "kid", "prc", "fd_dinov2" on request
    # FD_DINOv2 (EDM2, dgm-eval): Frechet distance in the features of this torch-fidelity DINOv2 extractor, from the
    # same samples; loaded through torch.hub (offline: a pre-filled hub cache, $TORCH_HOME/hub, see docs/fid.md)
    dinov2: str = "dinov2-vit-l-14"
    reference_npz: str = ""  # ADM reference batch (.npz with mu, sigma) instead of statistics of the real images
    reference_images: int = 0  # real images behind the reference statistics; 0 = all
    slice_size: int = 250  # images per actor call; each slice has its own seed, so results do not depend on workers
    batch_size: int = 250  # images per network evaluation batch
    compile: bool | None = None  # torch.compile the DiT for sampling; None (null) = on GPU, not on CPU
    workers: int = 0  # sampling actors; 0 = one per GPU, or one per CPU (beside training, in `ditscale run`: 1)
    cpus_per_worker: float = 1.0  # CPUs each sampling actor holds (a share, e.g. 0.5, lets it sit beside trials)
    gpus_per_worker: float = 1.0  # GPUs each sampling actor holds on a cluster with GPUs (0: sample on CPUs)
    # when `ditscale run` scores the milestones (FID_SCHEDULES): "spare" as each lands, on sampling actors that
    # hold fid.workers x (cpus|gpus)_per_worker beside the trials for the whole sweep (costs trial slots when the
    # cluster has none to spare; `--dry-run` says how many); "between": each trial scores its own milestones when it
    # has trained, on the resources its workers just released, before the next trial takes its slot (no slot lost;
    # a trial's curve appears when it ends); "after": once the whole sweep has trained
    schedule: str = "between"
    precision: str = "auto"  # the DiT's sampling precision: "auto" (bf16 autocast on a GPU, fp32 on a CPU), "bf16",
    # "fp32"; recorded with every score, and a run refuses scores of another precision (the VAE decodes in the
    # dtype data.prepare.codec.dtype encoded the shards with)
    seed: int = 0
    save_npz: bool = False  # also keep the samples as an ADM-evaluator .npz (arr_0, uint8 NHWC)

    def __post_init__(self) -> None:
        if self.num_samples < 2 or self.slice_size < 1 or self.batch_size < 1 or self.sampling_steps < 1:
            raise ConfigError("fid.num_samples must be >= 2 and fid.slice_size, batch_size, sampling_steps >= 1")
        if self.labels not in ("uniform", "balanced"):
            raise ConfigError(f"fid.labels must be 'uniform' or 'balanced', got {self.labels!r}")
        if self.classifier_steps < 0 or (self.classifier_steps == 0 and self.classifier_seconds <= 0):
            raise ConfigError("the classifier extractor needs fid.classifier_steps > 0 or fid.classifier_seconds > 0")
        unknown = set(self.metrics) - set(FID_METRICS)
        if unknown or "fid" not in self.metrics:
            raise ConfigError(f"fid.metrics must include 'fid' and only {', '.join(FID_METRICS)}; got {self.metrics}")
        if self.dinov2 not in DINOV2_EXTRACTORS:
            raise ConfigError(f"fid.dinov2 must be one of {', '.join(DINOV2_EXTRACTORS)}, got {self.dinov2!r}")
        if self.guidance_channels < 0 or self.workers < 0 or self.reference_images < 0:
            raise ConfigError("fid.guidance_channels, fid.workers and fid.reference_images must be >= 0")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError(
                f"fid.cpus_per_worker must be > 0 and fid.gpus_per_worker >= 0, got {self.cpus_per_worker} and "
                f"{self.gpus_per_worker}"
            )
        if self.schedule not in FID_SCHEDULES:
            raise ConfigError(f"fid.schedule must be one of {', '.join(FID_SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"fid.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.guidance_interval and (
            len(self.guidance_interval) != 2 or not 0 <= self.guidance_interval[0] <= self.guidance_interval[1] <= 1
        ):
            raise ConfigError(
                f"fid.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1 (noise levels t/T), or [] to "
                f"guide every step; got {list(self.guidance_interval)}"
            )

    @property
    def evaluations_per_image(self) -> int:
        """Network evaluations per sample: a step each (Heun: two), twice with classifier-free guidance (the
        conditional and the unconditional half of the batch). Times the DiT's Gflops: the sampling compute."""
        per_step = 2 if self.sampler == "heun" else 1
        return self.sampling_steps * per_step * (2 if self.cfg_scale != 1 else 1)


@dataclass(frozen=True)
class ExperimentConfig:
    """One scaling study."""

    name: str = "experiment"  # names the runs folder, the MLflow sweep run and the analysis folder
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    model: DiTOptions = field(default_factory=DiTOptions)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fid: FidConfig = field(default_factory=FidConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"name {self.name!r} must be letters, digits, '_', '-' or '.' (it names folders)")
        flow_sampler = self.fid.sampler in FLOW_SAMPLERS
        if (self.diffusion.objective == "flow") != flow_sampler:
            wanted = "one of " + ", ".join(FLOW_SAMPLERS) if not flow_sampler else "'ddpm', 'ddim' or a diffusers class"
            raise ConfigError(
                f"fid.sampler {self.fid.sampler!r} cannot sample diffusion.objective={self.diffusion.objective!r}: "
                f"set fid.sampler to {wanted}"
            )
        if self.train.global_batch_size % self.resources.workers_per_trial:
            raise ConfigError(
                f"train.global_batch_size {self.train.global_batch_size} is not divisible by "
                f"resources.workers_per_trial {self.resources.workers_per_trial}: every worker needs the same "
                f"batch; change one of them"
            )

    @property
    def mlflow_experiment(self) -> str:
        return self.tracking.experiment_name or self.name


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain JSON types (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))
