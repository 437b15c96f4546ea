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

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, ExperimentConfig, FidConfig
from pipeline.fid import classifier, reference, sampling
from pipeline.layout import ema_label
from pipeline.manifest import Manifest
from pipeline.plan import SweepPlan, plan_sweep


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """torch-fidelity's FID between two (mu, sigma) statistics."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensions: {stats_1['mu'].shape} vs {stats_2['mu'].shape}")
    s1 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, dtype=np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"])


@dataclass
class ScoringSetup:
    """What scoring needs before any sample: the feature spaces (the extractor trained once, for the classifier) and
    the real images' statistics in each (computed once on the actors and cached). `prepare_scoring` builds it once
    per process and FID settings; calling it ahead of the first checkpoint (`StudyScorer.warm_up`) takes this work
    off the critical path, and a missing extractor (weights, hub cache) fails there, before any sampling."""

    main: reference.FeatureSpace
    dinov2: reference.FeatureSpace | None
    reference: dict[str, np.ndarray]  # mu, sigma of the real images in `main`
    dinov2_reference: dict[str, np.ndarray] | None
    classify: bool  # the classifier extractor also judges class fidelity: its logits score the samples' labels


_SETUPS: dict[str, ScoringSetup] = {}


def prepare_scoring(fid: FidConfig, manifest: Manifest, workdir: str, pool: sampling.SamplerPool) -> ScoringSetup:
    """The ScoringSetup of `fid` for this dataset (see there); the real images are embedded on `pool`'s actors."""
    weights = reference.extractor_weights(fid, manifest, workdir, pool=pool)
    key = json.dumps(
        [reference.reference_key(fid, manifest, weights), fid.reference_npz, fid.metrics, fid.dinov2, workdir]
    )
    if key in _SETUPS:
        return _SETUPS[key]
    main, dinov2 = reference.scoring_spaces(fid, weights)
    pool.prepare([main] + ([dinov2] if dinov2 else []))
    keep = bool({"kid", "prc"} & set(fid.metrics))
    ref_stats, ref_feats = reference.reference_statistics(fid, manifest, workdir, main, pool, keep_features=keep)
    if keep:
        reference.real_features(fid, manifest, main, pool, ref_feats)
    dinov2_ref = None
    if dinov2 is not None:
        space = replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz="")
        dinov2_ref, _ = reference.reference_statistics(space, manifest, workdir, dinov2, pool)
    _SETUPS[key] = ScoringSetup(main, dinov2, ref_stats, dinov2_ref, fid.extractor == classifier.NAME)
    return _SETUPS[key]


def check_sample_count(fid: FidConfig) -> None:
    """Enough samples for a full-rank covariance in every feature space asked for."""
    spaces = [(fid.extractor, "fid.extractor")] + ([(fid.dinov2, "fid.dinov2")] if "fd_dinov2" in fid.metrics else [])
    for extractor, field_name in spaces:
        dim = reference.FEATURE_DIM.get(extractor)
        if dim and fid.num_samples <= dim:
            smaller = ", or fid.dinov2=dinov2-vit-s-14 (384-d)" if field_name == "fid.dinov2" else ""
            raise ValueError(
                f"fid.num_samples={fid.num_samples} gives a rank-deficient covariance of the {dim}-d {extractor} "
                f"features ({field_name}): use more than {dim} samples (the paper uses 50,000){smaller}"
            )


GRID_IMAGES = 100  # samples kept for the grid image logged beside each score


def sample_features(checkpoint: str, fid: FidConfig, spaces, pool: sampling.SamplerPool, all_images: bool, progress):
    """(slice index, [features per space], the checkpoint's training facts, images) of every slice of the
    checkpoint's samples, in slice order, drawn and embedded by the actors of `pool`; images are the slice's first
    ones that the grid still needs (all of them when `all_images`, for fid.save_npz), else None."""
    calls = []
    for index, count in sampling.slices(fid):
        wanted = count if all_images else max(0, min(count, GRID_IMAGES - index * fid.slice_size))
        calls.append((index, "embed_samples", (checkpoint, fid, index, count, tuple(spaces), wanted), count))
    for index, (feats, trained_with, images) in sampling.dispatch(pool, calls, "fid samples", progress):
        yield index, feats, trained_with, images


def score_checkpoint(
    checkpoint: str,
    manifest: Manifest,
    fid: FidConfig,
    workdir: str,
    workers: int = 0,
    progress: bool = True,
    pool: sampling.SamplerPool | None = None,
    npz_path: str | None = None,
) -> tuple[dict[str, float], np.ndarray, dict[str, str]]:
    """(metrics, the first 100 samples, facts) of one EMA checkpoint against the dataset's reference statistics.

    The actors of `pool` (a new pool if None) sample, decode and embed each slice on their own devices and return
    features; this process merges them into running statistics slice by slice, in slice order (the same FID
    whatever the number of actors), and holds features only where KID, precision/recall or the Inception Score need
    them. With fid.save_npz and `npz_path`, the samples are streamed into that ADM-evaluator .npz (arr_0) one slice
    at a time. Facts: the extractor, the sampler, and the precision of sampling, decoding and training.
    """
    from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint

    if pool is None:
        with sampling.SamplerPool(manifest.codec, fid, workers) as own:
            return score_checkpoint(checkpoint, manifest, fid, workdir, progress=progress, pool=own, npz_path=npz_path)
    ckpt = load_checkpoint(checkpoint)  # clear error if missing or not a dit_core checkpoint
    model_config = model_config_from_checkpoint(ckpt)
    del ckpt
    latent = manifest.latent_shape
    if (model_config.in_channels, model_config.input_size, model_config.input_size) != tuple(latent):
        raise ValueError(
            f"{checkpoint} is a model of {model_config.in_channels}x{model_config.input_size}x"
            f"{model_config.input_size} latents, but the dataset's latents are {'x'.join(map(str, latent))}"
        )
    check_sample_count(fid)
    setup = prepare_scoring(fid, manifest, workdir, pool)
    spaces = (setup.main,) + ((setup.dinov2,) if setup.dinov2 else ())
    layer = setup.main.layer
    keep_feats = bool({"kid", "prc"} & set(fid.metrics))
    gen = reference.Moments(reference.FEATURE_DIM.get(fid.extractor, 2048))
    dino = reference.Moments(reference.FEATURE_DIM[fid.dinov2]) if setup.dinov2 else None
    kept, logits, correct, grid, trained_with = [], [], 0, [], {}
    npz = _NpzWriter(npz_path, fid.num_samples) if fid.save_npz and npz_path else None

    t0 = time.perf_counter()
    for index, feats, slice_trained_with, images in sample_features(checkpoint, fid, spaces, pool, bool(npz), progress):
        main, trained_with = feats[0], slice_trained_with
        gen.add(main[layer])
        if keep_feats:
            kept.append(main[layer])
        if dino is not None:
            dino.add(feats[1]["dinov2"])
        if setup.classify:
            labels = sampling.slice_labels(fid, index, len(main[layer]), model_config.num_classes).numpy()
            correct += int((main["logits_unbiased"].argmax(1) == labels).sum())
        if "isc" in fid.metrics:
            logits.append(main["logits_unbiased"])
        if images is not None:
            if npz is not None:
                npz.write(images)
            if sum(len(g) for g in grid) < GRID_IMAGES:
                grid.append(images[: GRID_IMAGES - sum(len(g) for g in grid)])
    t_sample = time.perf_counter() - t0
    if npz is not None:
        npz.close()

    metrics = {"fid": frechet_distance(gen.statistics(), setup.reference)}
    if keep_feats:
        gen_feats = torch.from_numpy(np.concatenate(kept))
        ref_feats = torch.from_numpy(reference.real_features(fid, manifest, setup.main, pool))
        if "kid" in fid.metrics:
            from torch_fidelity.metric_kid import kid_features_to_metric

            subset = min(1000, len(gen_feats), len(ref_feats))
            kid = kid_features_to_metric(gen_feats, ref_feats, kid_subset_size=subset, verbose=False)
            metrics["kid"] = float(kid["kernel_inception_distance_mean"])
        if "prc" in fid.metrics:
            from torch_fidelity.metric_prc import prc_features_to_metric

            prc = prc_features_to_metric(gen_feats, ref_feats, verbose=False)
            metrics["precision"], metrics["recall"] = float(prc["precision"]), float(prc["recall"])
    if dino is not None:
        metrics["fd_dinov2"] = frechet_distance(dino.statistics(), setup.dinov2_reference)
    if setup.classify:
        metrics["class_accuracy"] = correct / fid.num_samples
    if "isc" in fid.metrics:
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(torch.from_numpy(np.concatenate(logits)))
        metrics["isc"] = float(isc["inception_score_mean"])
    metrics["fid_sample_seconds"] = t_sample
    weights = setup.main.weights
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
        **pool.facts(fid),
        "fid.train_precision": str(trained_with.get("precision", "unrecorded")),
        "fid.train_compile": str(trained_with.get("compile", "unrecorded")).lower(),
    }
    if "fd_dinov2" in fid.metrics:
        facts["fid.fd_dinov2_extractor"] = fid.dinov2
    if setup.classify:
        facts["fid.classifier_real_accuracy"] = f"{classifier.held_out_accuracy(weights):.4f}"
    samples = np.concatenate(grid) if grid else np.zeros((0, *manifest_image_shape(manifest)), np.uint8)
    return metrics, samples, facts


def manifest_image_shape(manifest: Manifest) -> tuple[int, int, int]:
    return (manifest.resolution, manifest.resolution, 3)


class _NpzWriter:
    """An ADM-evaluator .npz (one uint8 NHWC array arr_0) written slice by slice: a memory-mapped .npy beside it,
    zipped into place at the end, so no more than one slice of images is in memory at a time."""

    def __init__(self, path: str, count: int):
        self.path, self.count, self.filled, self.array = path, count, 0, None
        self.npy = f"{path}.arr_0.npy"

    def write(self, images: np.ndarray) -> None:
        if self.array is None:
            shape = (self.count, *images.shape[1:])
            self.array = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8, shape=shape)
        self.array[self.filled : self.filled + len(images)] = images
        self.filled += len(images)

    def close(self) -> None:
        import zipfile

        if self.array is None:
            return
        self.array.flush()
        del self.array
        tmp = f"{self.path}.tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            z.write(self.npy, "arr_0.npy")
        os.replace(tmp, self.path)
        os.remove(self.npy)


PRECISION_FACTS = ("fid.precision", "fid.decode_dtype", "fid.compile")  # a run never mixes scores that differ here


def fd_dinov2(images: np.ndarray, fid: FidConfig, manifest: Manifest, workdir: str, pool) -> float:
    """FD_DINOv2 (EDM2, dgm-eval) of uint8 (N, H, W, 3) images: the Frechet distance in the features of
    torch-fidelity's `fid.dinov2` extractor (loaded through torch.hub in the actors of `pool`), against the real
    images' statistics in the same space."""
    import ray

    space = reference.FeatureSpace(fid.dinov2, "", ("dinov2",))
    check_sample_count(replace(fid, num_samples=len(images), metrics=("fid", "fd_dinov2")))
    ref, _ = reference.reference_statistics(
        replace(fid, extractor=fid.dinov2, extractor_weights="", reference_npz=""), manifest, workdir, space, pool
    )
    actor = pool.actors[pool.first_ready()]
    feats = ray.get(actor.embed_images.remote(images, (space,)))[0]["dinov2"]
    return frechet_distance(reference.statistics(feats), ref)


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
        plan: SweepPlan | None = None,
        run_names: tuple[str, ...] | None = None,
    ):
        from pipeline import tracking

        self.experiment, self.workdir, self.uri, self.progress = experiment, workdir, uri, progress
        self.plan = plan or plan_sweep(experiment, workdir)
        self.trials = [t for t in self.plan.trials if run_names is None or t.run_name in run_names]
        self.exp_id = tracking.experiment_id(uri, experiment.mlflow_experiment)
        self.pool, self.own_pool = pool, pool is None
        self.run_ids: dict[str, str] = {}
        self.run_tags: dict[str, dict[str, str]] = {}  # what each trial's run says of its earlier scores
        self.scored: dict[tuple[str, float | None], set[int]] = {}  # (run name, decay) -> steps scored
        self.errors: dict[tuple[str, float | None, int], str] = {}  # checkpoints that could not be scored, and why

    def _pool(self) -> sampling.SamplerPool:
        if self.pool is None:
            self.pool = sampling.SamplerPool(self.plan.manifest.codec, self.experiment.fid)
        return self.pool

    def warm_up(self) -> None:
        """Train the extractor, build it in an actor and compute the reference statistics now, before any
        milestone lands."""
        prepare_scoring(self.experiment.fid, self.plan.manifest, self.workdir, self._pool())

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
            self.run_tags[trial.run_name] = dict(run.data.tags)
        return self.run_ids[trial.run_name]

    def _check_precision(self, trial, fid: FidConfig) -> None:
        """Refuse to add scores of another sampling precision, decoding dtype or compile to a run's curve."""
        facts = self._pool().facts(fid)
        earlier = self.run_tags.get(trial.run_name, {})
        differ = [
            f"{k}={earlier[k]} before, {facts[k]} now" for k in PRECISION_FACTS if earlier.get(k, facts[k]) != facts[k]
        ]
        if differ:
            raise ConfigError(
                f"run {trial.run_name} was scored at another precision ({'; '.join(differ)}): scores of different "
                f"precision must not share a curve; set fid.precision / fid.compile (and score on the same kind of "
                f"device) as before, or use another experiment name"
            )

    def pending(self) -> list[tuple[Any, float | None, int, str]]:
        """(trial, decay, step, path) of every milestone on disk not scored yet, in step order."""
        from pipeline import tracking

        todo = []
        for trial in self.trials:
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
        self._check_precision(trial, fid)
        with tempfile.TemporaryDirectory() as tmp:  # everything computed before anything is logged
            name = f"samples_{prefix.replace('/', '_')}step{step:07d}"
            npz = str(Path(tmp) / f"{name}.npz") if fid.save_npz else None
            metrics, samples, facts = score_checkpoint(
                path, self.plan.manifest, fid, self.workdir, progress=self.progress, pool=self._pool(), npz_path=npz
            )
            metrics = {f"{prefix}{k}": v for k, v in metrics.items()}
            grid = sampling.sample_grid(samples, Path(tmp) / f"{name}.png")
            tracking.set_tags(self.uri, run_id, facts)
            self.run_tags[trial.run_name].update(facts)
            logger = tracking.MetricLogger(self.uri, run_id)
            logger.log(metrics, step=step)
            if logger.close():
                raise RuntimeError(f"MLflow did not take the scores of step {step}")
            tracking.log_artifact(self.uri, run_id, grid, "samples")
            if npz is not None:
                tracking.log_artifact(self.uri, run_id, npz, "samples")
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


def score_trial(job) -> list[dict[str, Any]]:
    """fid.schedule "between": a trial that has trained scores its own milestones in its Tune slot, before the next
    trial takes it, on sampling actors that take the resources its workers just released (`fid.workers`, 0: as many
    as the trial had workers). Runs in the trial's Tune actor, which holds no GPU; checkpoints that cannot be scored
    are reported and left to the pass after the sweep."""
    fid = job.experiment.fid
    workers = fid.workers or job.experiment.resources.workers_per_trial
    with sampling.SamplerPool(job.manifest.codec, fid, workers) as pool:
        with StudyScorer(
            job.experiment, job.workdir, job.tracking_uri, pool, False, job.plan(), (job.trial.run_name,)
        ) as scorer:
            scorer.warm_up()
            scored = scorer.score_new()
            for (run, _, step), why in scorer.errors.items():
                print(f"[{run}] step {step}: not scored in the trial's slot ({why}); the pass after the sweep retries")
    return scored
