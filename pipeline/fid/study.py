"""The fid stage over a whole study: every milestone of every trial scored into its MLflow run, once.

    ditscale fid quickstart          # every milestone not scored yet (idempotent; safe while the sweep trains)

`StudyScorer` asks the plan for the trials and the layout for their milestones, and scores each checkpoint with
pipeline.fid.score; `ditscale run` drives it on fid.schedule: `ScoringWhileTraining` (a thread beside the sweep,
"spare"), `score_trial` (in a trial's own slot once it has trained, "between"), or `run_fid` after the sweep
("after", and whatever is left in every schedule). Results go to the trial's run at step = training step (metric
`fid`, ...), with tags naming the extractor, the sampler and the precision of every score, and a grid of samples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline import schema
from pipeline.config import ConfigError, ExperimentConfig, FidConfig
from pipeline.fid import sampling
from pipeline.fid.score import prepare_scoring, score_checkpoint
from pipeline.layout import ema_label
from pipeline.plan import SweepPlan, plan_sweep


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
                self.uri, self.exp_id, {schema.ROLE: schema.ROLE_TRIAL, schema.RUN_NAME: trial.run_name}
            )
            if run is None:
                return None
            previous, extractor = run.data.tags.get(schema.FID_EXTRACTOR), self.experiment.fid.extractor
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
            f"{k}={earlier[k]} before, {facts[k]} now"
            for k in schema.FID_PRECISION_FACTS
            if earlier.get(k, facts[k]) != facts[k]
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
                tracking.set_tags(self.uri, self.run_ids[trial.run_name], {schema.fid_error_tag(step): reason})
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


def run_fid(
    experiment: ExperimentConfig, workdir: str, progress: bool = True, plan: SweepPlan | None = None
) -> list[dict[str, Any]]:
    """Score every milestone not yet scored (idempotent; safe to run while the sweep trains). Raises FidErrors
    after scoring the rest when some checkpoints could not be scored."""
    from pipeline import tracking

    with tracking.tracking_uri(experiment.tracking.tracking_uri, workdir) as uri:
        with StudyScorer(experiment, workdir, uri, progress=progress, plan=plan) as scorer:
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

    def __init__(
        self, experiment: ExperimentConfig, workdir: str, uri: str, poll_s: float = 2.0, plan: SweepPlan | None = None
    ):
        import threading

        self.scorer = StudyScorer(experiment, workdir, uri, progress=False, plan=plan)
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
