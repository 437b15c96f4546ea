"""Planning a study: an experiment and its data -> trials with stable run names, checked before any work.

No Ray and no MLflow here: the sweep runs a plan, the fid stage scores one, the dry run prints one.

A trial's run name (e.g. `B_4-1c9e27d0`) is its size, its patch and a hash of everything that shapes its training
trajectory: the model, the diffusion objective, the optimiser recipe, the seed, the data and the worker count. The
same sweep run again finds the same runs (and resumes them); a new learning rate makes new ones. The step budget and
the checkpoint and logging intervals are not part of the name (unless the learning-rate schedule depends on the
step budget): raising `train.steps` continues the existing runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from dit_core.config import DiTConfig, DiTOptions, dit_config, parse_preset
from dit_core.diffusion import DiffusionConfig
from dit_core.flops import gflops, param_count, training_compute
from pipeline import schema
from pipeline.config import ConfigError, ExperimentConfig, TrainConfig, config_to_dict, flatten
from pipeline.experiment_files import variants
from pipeline.layout import TrialLayout, Workspace
from pipeline.manifest import Manifest
from pipeline.storage import list_names
from pipeline.trial_state import TrialState, trial_state

# ---------------------------------------------------------------------------------------------------------------
# What planning needs to know of the data
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """The latents and classes trials are built for: read off a shard manifest, or implied by the config."""

    latent_shape: tuple[int, int, int]  # (C, h, w)
    num_classes: int
    identity: dict[str, Any] | None  # what of the data enters run names; None = not prepared yet (names provisional)
    total: int | None = None  # samples in the shards (None: not prepared yet)
    basis: str = "the shard manifest"  # where the shape and the classes come from

    @classmethod
    def of(cls, manifest: Manifest) -> DataSpec:
        return cls(manifest.latent_shape, manifest.num_classes, manifest.identity(), manifest.total)


def implied_data(experiment: ExperimentConfig, workspace: Workspace) -> DataSpec:
    """What data.shards will hold once prepared: the codec's latent shape at data.prepare.resolution, and the class
    count of the toy data, of a local source folder, or ImageNet's 1000."""
    d = experiment.data
    shape, shape_basis = d.prepare.codec.implied_latent_shape(d.prepare.resolution)
    if d.source == "toy":
        classes, class_basis = d.toy.num_classes, "data.toy.num_classes"
    elif d.source and (folders := [n for n in list_names(workspace.path(d.source)) if not n.startswith(".")]):
        classes, class_basis = len(folders), f"the class folders of {d.source}"
    else:
        classes, class_basis = 1000, "assumed: ImageNet's 1000 classes"
    basis = f"latents {'x'.join(map(str, shape))} ({shape_basis}), {classes} classes ({class_basis})"
    return DataSpec(shape, classes, None, None, basis)


# ---------------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """One grid point: a model preset trained with the experiment's recipe, as its variant sets it."""

    preset: str
    model: DiTConfig
    run_name: str  # stable: same config -> same name -> same storage folder and MLflow run
    experiment: ExperimentConfig  # what this trial trains and how it is scored: the study with its variant applied
    variant: str = ""  # the variant and axis values, e.g. "modern" or "mlp=swiglu" ("": the study has none)
    settings: dict[str, Any] = field(default_factory=dict)  # config path -> value, set by the variant and axes
    replicate: bool = False  # one of several seeds of the same grid point (grid.seeds)

    @property
    def seed(self) -> int:
        return self.experiment.train.seed

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

    @property
    def training_compute(self) -> dict[str, float]:
        """`dit_core.flops.training_compute` of this trial's steps at its global batch."""
        train = self.experiment.train
        return training_compute(self.model, train.global_batch_size, train.steps)


# Fields added after run names were first published enter the hash only when set off their defaults, so that the
# runs made before them keep their names (and resume).
LATER_FIELDS = {
    "model": {name: getattr(DiTOptions(), name) for name in ("positions", "mlp", "norm", "qk_norm")},
    "diffusion": {
        name: getattr(DiffusionConfig(), name)
        for name in ("objective", "timestep_sampling", "logit_normal_mean", "logit_normal_std")
    },
    "train": {"ema_decays": ()},
}


def _without_later_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    later = LATER_FIELDS[section]
    same = lambda k, v: json.dumps(v) == json.dumps(later[k])  # noqa: E731 (tuples and lists alike)
    return {k: v for k, v in values.items() if not (k in later and same(k, v))}


def trajectory_identity(experiment: ExperimentConfig, model: DiTConfig, data: dict[str, Any] | None) -> dict:
    """Everything that shapes a trial's training trajectory (hashed into its run name)."""
    train = {k: v for k, v in config_to_dict(experiment.train).items() if k not in TrainConfig.RUNTIME_FIELDS}
    if experiment.train.lr_schedule == "constant":
        train.pop("steps")  # more steps continue the same run
    model_fields = {k: v for k, v in config_to_dict(model).items() if k not in DiTConfig.RUNTIME_FIELDS}
    return {
        "model": _without_later_defaults("model", model_fields),
        "diffusion": _without_later_defaults("diffusion", config_to_dict(experiment.diffusion)),
        "train": _without_later_defaults("train", train),
        "data": data,
        "workers": experiment.resources.workers_per_trial,
    }


def run_name(preset: str, identity: dict[str, Any], variant: str = "", seed: int | None = None) -> str:
    """`<size>_<patch>[-<variant>][-s<seed>]-<hash>`, e.g. `B_4-1c9e27d0`, `d2w48_4-modern-5f0e1a2b` or
    `B_4-s1-0a3c5e7d` (a replicate of grid.seeds)."""
    size, patch = parse_preset(preset)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    parts = [f"{size}_{patch}", variant, f"s{seed}" if seed is not None else "", digest]
    return "-".join(p for p in parts if p)


def expand_trials(experiment: ExperimentConfig, data: DataSpec) -> list[Trial]:
    """The trials of an experiment (variants x axis values x presets x seeds) for data of `data.latent_shape` and
    `data.num_classes`. Replicates (grid.seeds) differ only in train.seed: initial weights, data order, noise."""
    channels, height, _ = data.latent_shape
    trials, seen = [], {}
    seeds = experiment.grid.seeds or (None,)
    for variant, seed in itertools.product(variants(experiment), seeds):
        e = variant.experiment
        if seed is not None:
            e = replace(e, train=replace(e.train, seed=seed))
        for preset in e.grid.preset_names():
            where = preset + (f" ({variant.label})" if variant.label else "")
            try:
                model = dit_config(
                    preset,
                    e.model,
                    input_size=height,
                    in_channels=channels,
                    num_classes=data.num_classes,
                    learn_sigma=e.diffusion.learn_sigma,
                )
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            identity = trajectory_identity(e, model, data.identity)
            key = json.dumps([preset, identity], sort_keys=True)
            if key in seen:
                raise ConfigError(
                    f"{where} trains exactly what {seen[key]} trains (they differ only in fields that do not "
                    f"shape training): drop one, or score both from one run"
                )
            seen[key] = where
            name = run_name(preset, identity, variant.label, seed)
            trials.append(Trial(preset, model, name, e, variant.label, variant.settings, seed is not None))
    return trials


# ---------------------------------------------------------------------------------------------------------------
# Checks against the data (before any trial starts)
# ---------------------------------------------------------------------------------------------------------------


class MissingShardsError(ConfigError):
    """data.shards does not exist yet (a dry run can still plan the study from the config)."""


def check_data(experiment: ExperimentConfig, manifest: Manifest, shards: str) -> None:
    """The shards are what the experiment expects: codec, resolution, latents the patch sizes tile, one batch."""
    wanted = experiment.data.prepare
    if manifest.codec.kind != wanted.codec.kind:
        raise ConfigError(
            f"shards in {shards} were made with the {manifest.codec.kind!r} codec but the experiment expects "
            f"{wanted.codec.kind!r}: set data.prepare.codec.kind={manifest.codec.kind} or point data.shards elsewhere"
        )
    if manifest.resolution != wanted.resolution:
        raise ConfigError(
            f"shards in {shards} are at {manifest.resolution} px but the experiment expects {wanted.resolution} px: "
            f"set data.prepare.resolution={manifest.resolution} or prepare shards at {wanted.resolution} px"
        )
    latent = manifest.latent_shape[1]
    for preset in experiment.grid.preset_names():
        patch = parse_preset(preset)[1]
        if latent % patch:
            raise ConfigError(
                f"{preset}: patch size {patch} does not divide the {latent}x{latent} latents of {shards}; "
                f"drop it from the grid or use another resolution"
            )
    batch = max(v.experiment.train.global_batch_size for v in variants(experiment))
    if manifest.total < batch:
        raise ConfigError(
            f"{shards} holds {manifest.total} samples, fewer than one global batch ({batch}): lower "
            f"train.global_batch_size"
        )


def check_validation_data(experiment: ExperimentConfig, train: Manifest, val: Manifest, val_shards: str) -> None:
    if (val.codec, val.latent_shape) != (train.codec, train.latent_shape):
        raise ConfigError(f"validation shards {val_shards} were made with another codec or latent shape")
    batch = max(v.experiment.train.global_batch_size for v in variants(experiment))
    per_worker = batch // experiment.resources.workers_per_trial
    if val.total < per_worker:
        raise ConfigError(
            f"validation shards {val_shards} hold {val.total} samples, fewer than one per-worker batch "
            f"({per_worker}): prepare more validation images or set data.val_shards=null"
        )


def _load_shards(path: str, field: str) -> Manifest:
    try:
        return Manifest.load(path)
    except FileNotFoundError:
        raise MissingShardsError(
            f"no shards at {path} ({field}): run `ditscale prepare SRC {path}` first, or `ditscale run` with "
            f"data.source (or data.val_source) set to build them"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPlan:
    experiment: ExperimentConfig
    workspace: Workspace
    shards: str  # resolved data.shards
    val_shards: str | None  # resolved data.val_shards
    data: DataSpec
    trials: tuple[Trial, ...]
    manifest: Manifest | None  # None: planned from the config before the shards exist

    @property
    def storage(self) -> str:
        return self.workspace.runs(self.experiment.name)

    def layout(self, trial: Trial) -> TrialLayout:
        return self.workspace.trial(self.experiment.name, trial.run_name)

    def state(self, trial: Trial, live_since_unix_s: float | None = None) -> TrialState:
        """The trial's state (pipeline.trial_state), for a study at work since `live_since_unix_s` if given."""
        return trial_state(self.layout(trial), trial.experiment.train.steps, live_since_unix_s)


def plan_sweep(experiment: ExperimentConfig, workdir: str) -> SweepPlan:
    """The experiment's trials for its shards, checked against them; raises ConfigError before any work."""
    workspace = Workspace(workdir)
    shards = workspace.path(experiment.data.shards)
    manifest = _load_shards(shards, "data.shards")
    check_data(experiment, manifest, shards)
    val_shards = None
    if experiment.data.val_shards:
        val_shards = workspace.path(experiment.data.val_shards)
        check_validation_data(experiment, manifest, _load_shards(val_shards, "data.val_shards"), val_shards)
    data = DataSpec.of(manifest)
    return SweepPlan(experiment, workspace, shards, val_shards, data, tuple(expand_trials(experiment, data)), manifest)


def plan_study(experiment: ExperimentConfig, workdir: str) -> SweepPlan:
    """The plan from the shards if they exist, else from what the config implies (run names then provisional)."""
    try:
        return plan_sweep(experiment, workdir)
    except MissingShardsError:
        workspace = Workspace(workdir)
        data = implied_data(experiment, workspace)
        val = workspace.path(experiment.data.val_shards) if experiment.data.val_shards else None
        trials = tuple(expand_trials(experiment, data))
        return SweepPlan(experiment, workspace, workspace.path(experiment.data.shards), val, data, trials, None)


# ---------------------------------------------------------------------------------------------------------------
# What a trial's workers get, and what MLflow records of it
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialJob:
    """Everything the workers of one trial need (Ray pickles it to each worker)."""

    experiment: ExperimentConfig
    trial: Trial
    layout: TrialLayout
    shards: str
    val_shards: str | None
    tracking_uri: str
    mlflow_run_id: str
    workdir: str = ""  # the workspace's root
    data: DataSpec | None = None  # the plan's view of the shards
    manifest: Manifest | None = None
    # called with this job in the trial's Tune actor once it has trained (fid.schedule "between": the fid stage's
    # score_trial, handed in by `ditscale run`); a module-level function, so that Ray can pickle it
    after_training: Callable[[TrialJob], Any] | None = None

    def plan(self) -> SweepPlan:
        """The plan of this trial alone (what the fid stage asks of a plan), without planning the study again."""
        return SweepPlan(
            self.experiment, Workspace(self.workdir), self.shards, self.val_shards, self.data, (self.trial,),
            self.manifest,
        )  # fmt: skip


def trial_job(
    plan: SweepPlan, trial: Trial, tracking_uri: str, mlflow_run_id: str, after_training: Callable | None = None
) -> TrialJob:
    return TrialJob(
        trial.experiment,
        trial,
        plan.layout(trial),
        plan.shards,
        plan.val_shards,
        tracking_uri,
        mlflow_run_id,
        plan.workspace.root,
        plan.data,
        plan.manifest,
        after_training,
    )


def objective_name(experiment: ExperimentConfig) -> str:
    """e.g. 'eps+learned-sigma (hybrid)' or 'flow velocity (logit_normal(0, 1))'."""
    d = experiment.diffusion
    if d.objective == "flow":
        times = "uniform t" if d.timestep_sampling == "uniform" else (
            f"logit_normal({d.logit_normal_mean:g}, {d.logit_normal_std:g})"
        )  # fmt: skip
        return f"flow velocity ({times})"
    return f"{d.prediction}{'+learned-sigma' if d.learn_sigma else ''} ({d.loss})"


def trial_params(plan: SweepPlan, trial: Trial) -> dict[str, Any]:
    """MLflow params of a trial's run: its flattened experiment config, its variant and axis values (`variant`,
    `axis.<path>`), and its model facts."""
    params = flatten(config_to_dict(trial.experiment))
    for key in ("grid.presets", "grid.axes", "grid.variants"):
        params.pop(key, None)
    params.update(flatten({"model": config_to_dict(trial.model)}))
    params.update({f"{schema.AXIS_PREFIX}{path}": value for path, value in trial.settings.items()})
    params.update(
        {
            schema.PRESET: trial.preset,
            schema.SIZE: trial.size,
            schema.PATCH: trial.patch,
            schema.PARAMS: trial.params,
            schema.GFLOPS: trial.gflops,
            schema.PARAM_RUN_NAME: trial.run_name,
            schema.VARIANT: trial.variant or DEFAULT_VARIANT,
            schema.SEED: trial.seed,
            schema.OBJECTIVE: objective_name(trial.experiment),
            schema.MANIFEST_TOTAL: plan.data.total,
        }
    )
    return params


DEFAULT_VARIANT = schema.DEFAULT_VARIANT  # the `variant` param of a study without variants or axes
