"""calc: the metrics of one checkpoint, and the fid stage that scores every milestone of a study into MLflow.

    ditscale fid quickstart                          # every milestone of every trial not scored yet
    ditscale fid quickstart --checkpoint PATH        # one checkpoint, printed only

A checkpoint's samples (pipeline.fid.sampling) and the real images' statistics (pipeline.fid.reference) go through
torch-fidelity's feature extractor and metric functions: FID always; IS, KID and precision/recall on request. Results
go to the trial's MLflow run at step = training step (metric `fid`, ...), with tags naming the extractor
(`fid.extractor`, `fid.extractor_weights`) so numbers from different extractors are never mixed, and a grid of
samples as an artifact. A trial's run refuses scores from another extractor than the one it has. The stage asks the
plan for the trials and the layout for their milestones.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, ExperimentConfig, FidConfig
from pipeline.fid import classifier, reference, sampling
from pipeline.layout import ema_label
from pipeline.manifest import Manifest
from pipeline.plan import plan_sweep


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """torch-fidelity's FID between two (mu, sigma) statistics."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensions: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


def scoring_space(fid: FidConfig, manifest: Manifest, workdir: str):
    """What scoring needs before any sample: the extractor (trained once, for the classifier), its reference
    statistics (computed once and cached), and the DINOv2 space when fd_dinov2 is asked for. Calling it ahead of
    the first checkpoint (`StudyScorer.warm_up`) takes this work off the critical path."""
    cuda = torch.cuda.is_available()
    weights = reference.extractor_weights(fid, manifest, workdir)
    layer = reference.feature_layer(fid)
    # the classifier extractor is also the judge of class fidelity: its logits score the samples' labels
    classify = fid.extractor == classifier.NAME
    layers = sorted({layer} | ({"logits_unbiased"} if "isc" in fid.metrics or classify else set()))
    extractor = reference.make_extractor(fid, weights, cuda, layers)
    ref_stats, ref_feats = reference.reference_statistics(fid, manifest, workdir, weights, extractor, cuda)
    dinov2 = DinoV2Space(fid, manifest, workdir, cuda) if "fd_dinov2" in fid.metrics else None
    return cuda, weights, layer, classify, extractor, ref_stats, ref_feats, dinov2


def score_checkpoint(
    checkpoint: str,
    manifest: Manifest,
    fid: FidConfig,
    workdir: str,
    workers: int = 0,
    progress: bool = True,
    pool: sampling.SamplerPool | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, str]]:
    """(metrics, samples, extractor facts) of one EMA checkpoint against the dataset's reference statistics.

    `pool` draws the samples (a stage scoring many checkpoints passes one); None starts one for this checkpoint.
    """
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint

    ckpt = load_checkpoint(checkpoint)  # clear error if missing or not a dit_core checkpoint
    model_config = model_config_from_checkpoint(ckpt)
    latent = manifest.latent_shape
    if (model_config.in_channels, model_config.input_size, model_config.input_size) != tuple(latent):
        raise ValueError(
            f"{checkpoint} is a model of {model_config.in_channels}x{model_config.input_size}x"
            f"{model_config.input_size} latents, but the dataset's latents are {'x'.join(map(str, latent))}"
        )
    dim = reference.FEATURE_DIM.get(fid.extractor)
    if dim and fid.num_samples <= dim:
        raise ValueError(
            f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {fid.extractor} "
            f"features: use more than {dim} samples (the paper uses 50,000)"
        )
    cuda, weights, layer, classify, extractor, ref_stats, ref_feats, dinov2 = scoring_space(fid, manifest, workdir)

    t0 = time.perf_counter()
    samples = sampling.generate(checkpoint, manifest.codec, fid, workers, progress, pool)
    t_sample = time.perf_counter() - t0
    gen_feats = reference.features(samples, extractor, cuda)
    metrics = {"fid": frechet_distance(reference.statistics(gen_feats[layer]), ref_stats)}
    if {"kid", "prc"} & set(fid.metrics):
        ref_feats = reference.real_features(fid, manifest, weights, extractor, cuda, ref_feats)
        if "kid" in fid.metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            subset = min(1000, len(samples), len(ref_feats[layer]))
            kid = kid_features_to_metric(gen_feats[layer], ref_feats[layer], kid_subset_size=subset, verbose=False)
            metrics["kid"] = float(kid["kernel_inception_distance_mean"])
        if "prc" in fid.metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            prc = prc_features_to_metric(gen_feats[layer], ref_feats[layer], verbose=False)
            metrics["precision"], metrics["recall"] = float(prc["precision"]), float(prc["recall"])
    if dinov2 is not None:
        metrics["fd_dinov2"] = dinov2.distance(samples)
    if classify:
        labels = torch.from_numpy(sampling.sample_labels(fid, model_config.num_classes))
        metrics["class_accuracy"] = float((gen_feats["logits_unbiased"].argmax(1).cpu() == labels).float().mean())
    if "isc" in fid.metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        metrics["isc"] = float(isc_features_to_metric(gen_feats["logits_unbiased"])["inception_score_mean"])
    metrics["fid_sample_seconds"] = t_sample
    facts = {
        "fid.extractor": fid.extractor,
        "fid.extractor_weights": reference.reference_key(fid, manifest, weights)["weights"] or "torch-fidelity default",
        "fid.reference": fid.reference_npz or "dataset statistics",
        "fid.num_samples": str(fid.num_samples),
        "fid.sampler": f"{fid.sampler}-{fid.sampling_steps}",
        "fid.cfg_scale": str(fid.cfg_scale),
        "fid.guidance_channels": str(fid.guidance_channels or "all"),
        "fid.guidance_interval": str(list(fid.guidance_interval) or "all steps"),
        "fid.labels": fid.labels,
        "fid.evaluations_per_image": str(fid.evaluations_per_image),
    }
    if "fd_dinov2" in fid.metrics:
        facts["fid.fd_dinov2_extractor"] = fid.dinov2
    if classify:
        facts["fid.classifier_real_accuracy"] = f"{classifier.held_out_accuracy(weights):.4f}"
    return metrics, samples, facts


class DinoV2Space:
    """FD_DINOv2 (EDM2, dgm-eval): the Frechet distance in the features of torch-fidelity's `fid.dinov2` extractor
    (loaded through torch.hub), against the real images' statistics in the same space (cached like FID's). Built
    before any sampling, so that a missing hub cache fails at once."""

    def __init__(self, fid: FidConfig, manifest: Manifest, workdir: str, cuda: bool):
        self.space = replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz="")
        dim = reference.FEATURE_DIM[fid.dinov2]
        if fid.num_samples <= dim:
            raise ValueError(
                f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {fid.dinov2} "
                f"features: use more than {dim} samples, or fid.dinov2=dinov2-vit-s-14 (384-d)"
            )
        self.layer, self.cuda = reference.feature_layer(self.space), cuda
        self.extractor = reference.make_extractor(self.space, "", cuda, [self.layer])
        self.reference, _ = reference.reference_statistics(self.space, manifest, workdir, "", self.extractor, cuda)

    def distance(self, images: np.ndarray) -> float:
        feats = reference.features(images, self.extractor, self.cuda)[self.layer]
        return frechet_distance(reference.statistics(feats), self.reference)


def fd_dinov2(images: np.ndarray, fid: FidConfig, manifest: Manifest, workdir: str, cuda: bool) -> float:
    """FD_DINOv2 of uint8 (N, H, W, 3) images (see DinoV2Space)."""
    return DinoV2Space(replace(fid, num_samples=len(images)), manifest, workdir, cuda).distance(images)


class StudyScorer:
    """Scores a study's EMA milestones into MLflow: each call of `score_new` scores every milestone on disk that its
    trial's run has no score for yet (so it is idempotent, and safe while the sweep trains).

    It asks the plan for the trials and the layout for their milestones, reads which steps MLflow has scored once
    per (trial, EMA), then remembers what it scored. A checkpoint that cannot be scored (an unreadable file, a
    sampling actor lost) is reported, tagged on its run (`fid.error.step<N>`) and skipped: the other checkpoints go
    on, and the next call tries it again.
    """

    def __init__(
        self,
        experiment: ExperimentConfig,
        workdir: str,
        uri: str,
        pool: sampling.SamplerPool | None = None,
        progress: bool = True,
    ):
        from pipeline import tracking

        self.experiment, self.workdir, self.uri, self.progress = experiment, workdir, uri, progress
        self.plan = plan_sweep(experiment, workdir)
        self.exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        self.pool, self.own_pool = pool, pool is None
        self.run_ids: dict[str, str] = {}
        self.scored: dict[tuple[str, float | None], set[int]] = {}  # (run name, decay) -> steps scored
        self.errors: dict[tuple[str, float | None, int], str] = {}  # checkpoints that could not be scored, and why

    def warm_up(self) -> None:
        """Train the extractor and compute the reference statistics now, before any milestone lands."""
        scoring_space(self.experiment.fid, self.plan.manifest, self.workdir)

    def _run_id(self, trial) -> str | None:
        """The trial's MLflow run id (None until the sweep has created it); checks its extractor."""
        from pipeline import tracking

        if trial.run_name not in self.run_ids:
            run = tracking.find_run(
                self.uri, self.exp_id, {tracking.TAG_ROLE: "trial", tracking.TAG_RUN_NAME: trial.run_name}
            )
            if run is None:
                return None
            previous, extractor = run.data.tags.get("fid.extractor"), self.experiment.fid.extractor
            if previous and previous != extractor:
                raise ConfigError(
                    f"run {trial.run_name} was scored with {previous}, not {extractor}: FIDs of different "
                    f"extractors must not share a curve; set fid.extractor={previous} or use another experiment name"
                )
            self.run_ids[trial.run_name] = run.info.run_id
        return self.run_ids[trial.run_name]

    def pending(self) -> list[tuple[Any, float | None, int, str]]:
        """(trial, decay, step, path) of every milestone on disk not scored yet, in step order."""
        from pipeline import tracking

        todo = []
        for trial in self.plan.trials:
            for decay in (None, *trial.experiment.train.ema_decays):
                available = self.plan.layout(trial).milestones(decay)
                if not available:
                    continue
                run_id = self._run_id(trial)
                if run_id is None:
                    raise ConfigError(
                        f"no MLflow run for trial {trial.run_name}: run `ditscale sweep {self.experiment.name}`"
                    )
                key = (trial.run_name, decay)
                if key not in self.scored:
                    metric = f"{_prefix(decay)}fid"
                    self.scored[key] = {step for step, _ in tracking.metric_history(self.uri, run_id, metric)}
                todo += [(trial, decay, step, available[step]) for step in sorted(set(available) - self.scored[key])]
        return sorted(todo, key=lambda item: item[2])

    def score_new(self) -> list[dict[str, Any]]:
        """Score every milestone not scored yet; returns one record per checkpoint scored now."""
        scored_now = []
        for trial, decay, step, path in self.pending():
            if self.pool is None:
                self.pool = sampling.SamplerPool(self.plan.manifest.codec, self.experiment.fid)
            try:
                record = self._score(trial, decay, step, path)
            except ConfigError:
                raise
            except Exception as exc:  # noqa: BLE001 (one bad checkpoint never stops the stage)
                self._failed(trial, decay, step, exc)
                continue
            self.scored[(trial.run_name, decay)].add(step)
            self.errors.pop((trial.run_name, decay, step), None)
            scored_now.append(record)
        return scored_now

    def _score(self, trial, decay: float | None, step: int, path: str) -> dict[str, Any]:
        from pipeline import tracking

        run_id, prefix = self.run_ids[trial.run_name], _prefix(decay)
        fid = trial.experiment.fid  # the trial's own sampling (its variant may set the sampler)
        metrics, samples, facts = score_checkpoint(
            path, self.plan.manifest, fid, self.workdir, progress=self.progress, pool=self.pool
        )
        metrics = {f"{prefix}{k}": v for k, v in metrics.items()}
        with tempfile.TemporaryDirectory() as tmp:  # everything computed before anything is logged
            name = f"samples_{prefix.replace('/', '_')}step{step:07d}"
            grid = sampling.sample_grid(samples, Path(tmp) / f"{name}.png")
            tracking.set_tags(self.uri, run_id, facts)
            logger = tracking.MetricLogger(self.uri, run_id)
            logger.log(metrics, step=step)
            if logger.close():
                raise RuntimeError(f"MLflow did not take the scores of step {step}")
            tracking.log_artifact(self.uri, run_id, grid, "samples")
            if fid.save_npz:
                npz = Path(tmp) / f"{name}.npz"
                np.savez(npz, arr_0=samples)
                tracking.log_artifact(self.uri, run_id, str(npz), "samples")
        print(
            f"[{trial.run_name}] step {step:,}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
            flush=True,
        )
        return {"run_name": trial.run_name, "step": step, "ema_decay": decay, **metrics}

    def _failed(self, trial, decay: float | None, step: int, exc: Exception) -> None:
        from pipeline import tracking

        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        key = (trial.run_name, decay, step)
        if self.errors.get(key) != reason:
            print(f"[{trial.run_name}] step {step:,}: cannot score {_prefix(decay)}fid: {reason}", flush=True)
            try:
                tracking.set_tags(self.uri, self.run_ids[trial.run_name], {f"fid.error.step{step}": reason})
            except Exception:  # noqa: BLE001 (the report above is what matters)
                pass
        self.errors[key] = reason

    def close(self) -> None:
        if self.pool is not None and self.own_pool:
            self.pool.close()
        self.pool = None

    def __enter__(self) -> StudyScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prefix(decay: float | None) -> str:
    """The metric prefix of an EMA: "" for train.ema_decay's (plain `fid`), `ema0.999/` for a further one."""
    return "" if decay is None else f"{ema_label(decay)}/"


def run_fid(experiment: ExperimentConfig, workdir: str, progress: bool = True) -> list[dict[str, Any]]:
    """Score every milestone not yet scored (idempotent; safe to run while the sweep trains). Raises FidErrors
    after scoring the rest when some checkpoints could not be scored."""
    from pipeline import tracking

    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        with StudyScorer(experiment, workdir, uri, progress=progress) as scorer:
            scored_now = scorer.score_new()
            errors = dict(scorer.errors)
    if not scored_now and not errors:
        print("fid: nothing new to score")
    if errors:
        raise FidErrors(errors)
    return scored_now


class FidErrors(RuntimeError):
    """Some checkpoints could not be scored (the others were); names each with its reason."""

    def __init__(self, errors: dict[tuple[str, float | None, int], str]):
        self.errors = errors
        listed = "; ".join(
            f"{run} step {step}{'' if d is None else f' (EMA {d})'}: {why}" for (run, d, step), why in errors.items()
        )
        super().__init__(f"{len(errors)} checkpoint(s) could not be scored: {listed}")


class ScoringWhileTraining:
    """`ditscale run`'s fid stage beside the sweep: a thread that scores each milestone as soon as its EMA weights
    land, on sampling actors that hold resources of their own (`fid.workers` actors, 1 if unset, each with
    `fid.cpus_per_worker` CPUs or `fid.gpus_per_worker` GPUs), so that FID curves fill in MLflow while the trials
    train and the study ends soon after its last trial.

        with ScoringWhileTraining(experiment, workdir, uri) as scoring:
            run_sweep(experiment, workdir, reserved=scoring.reserved)
            scoring.finish()     # the milestones the last trials wrote, scored now
    """

    def __init__(self, experiment: ExperimentConfig, workdir: str, uri: str, poll_s: float = 2.0):
        import threading

        self.scorer = StudyScorer(experiment, workdir, uri, progress=False)
        self.pool = sampling.SamplerPool(self.scorer.plan.manifest.codec, experiment.fid, beside_training=True)
        self.scorer.pool = self.pool
        self.reserved = self.pool.reserved
        self.poll_s, self.scored, self.error = poll_s, [], None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="ditscale-fid", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        try:
            self.scorer.warm_up()
            while True:
                self.scored += self.scorer.score_new()
                if self.stop.wait(self.poll_s):
                    return
        except BaseException as exc:  # noqa: BLE001 (raised again by finish(), in the main thread)
            self.error = exc

    def finish(self) -> list[dict[str, Any]]:
        """Stop watching, score what is left, and return every record scored (raise what the thread raised; a
        FidErrors for checkpoints that could not be scored)."""
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.scored += self.scorer.score_new()
        if self.scorer.errors:
            raise FidErrors(dict(self.scorer.errors))
        return self.scored

    def close(self) -> None:
        """Stop the thread and the actors (a sampling call in flight fails and ends the thread)."""
        self.stop.set()
        self.pool.close()
        self.thread.join(timeout=60)

    def __enter__(self) -> ScoringWhileTraining:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
