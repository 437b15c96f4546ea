"""What the tests share: the fast FID settings, waiting on progress (never on a speed), holding a trial at a step
while a fault is caused, a tiny AutoencoderKL (random weights) made and saved locally, never downloaded, and a shard
manifest of 200 pixel-codec samples at 16 px that no shards stand behind."""

from pathlib import Path

import torch

# FID in seconds on the smoke shards: 200 DDIM-10 samples, the classifier extractor trained for 50 steps (a fixed
# count, not a time budget: the same extractor, and so the same FIDs, on every machine; 95% held-out accuracy on the
# smoke data, chance 25%).
FAST_FID = [
    "fid.num_samples=200",
    "fid.sampler=ddim",
    "fid.sampling_steps=10",
    "fid.extractor=ditscale-classifier",
    "fid.classifier_steps=50",
    "fid.slice_size=50",
    "fid.batch_size=50",
]


def sweep_and_score(overrides: list[str], workdir: str):
    """The smoke experiment with `overrides`, trained and scored: (experiment, outcomes)."""
    from pipeline.experiment_files import load_experiment
    from pipeline.fid.study import run_fid
    from pipeline.sweep import run_sweep

    experiment = load_experiment("smoke", overrides)
    outcomes = run_sweep(experiment, workdir)
    run_fid(experiment, workdir, progress=False)
    return experiment, outcomes


def tiny_vae():
    """A 2-level AutoencoderKL: 4 latent channels, /2 downsampling, 16 px samples."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )


def save_tiny_vae(path: Path) -> Path:
    """The tiny VAE written with save_pretrained, to exercise AutoencoderKL.from_pretrained on a local folder."""
    tiny_vae().save_pretrained(path)
    return path


def pixel_manifest():
    """The manifest of 200 samples of 4 classes, 16 px, pixel codec, in one shard (for planning tests)."""
    from pipeline.codecs import CodecInfo
    from pipeline.manifest import Manifest, ShardEntry, SourceInfo

    return Manifest(
        resolution=16,
        class_names=("a", "b", "c", "d"),
        source=SourceInfo("x", 200, "abc"),
        config={},
        planned_shards=1,
        shards=(ShardEntry(0, "train-000000.tar", 200, "0" * 64, 1),),
        complete=True,
        codec=CodecInfo("pixel", latent_channels=3, scale_factor=1.0, stores_moments=False, space_to_depth=1),
        latent_shape=(3, 16, 16),
        stored_shape=(3, 16, 16),
    )


def trial_runs(uri: str, sweep: str) -> list:
    """The MLflow child runs of a sweep (its trials), read with MLflow's own client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`ditscale.role` = 'trial' and tags.`ditscale.sweep` = '{sweep}'"
    return client.search_runs(experiments, filter_string=query, max_results=1000)


def newest_change(folder) -> float:
    """The latest modification time of anything under `folder` (0 if nothing): files come and go as a job runs."""
    newest = 0.0
    for path in Path(folder).rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest


def wait_for(condition, what: str, proc=None, stall_s: float = 600.0, watch=None, failed=None) -> None:
    """Wait until `condition()` holds. Not a speed requirement: it fails only if the subprocess `proc` exits first,
    `failed()` returns an error, or nothing progresses for `stall_s` seconds (a hang): with `watch`, a folder, any
    change under it counts as progress."""
    import time

    last_progress, seen, scanned = time.monotonic(), None, 0.0
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        error = failed() if failed is not None else None
        if error is not None:
            raise AssertionError(f"failed before {what}: {error!r}")
        now = time.monotonic()
        if watch is not None and now - scanned > 5:
            scanned, newest = now, newest_change(watch)
            if newest != seen:
                seen, last_progress = newest, now
        assert now - last_progress < stall_s, f"no {what}, and no progress for {stall_s:.0f} s"
        time.sleep(0.05)


def registered_checkpoint(trial_dir) -> bool:
    """Ray Train has registered a checkpoint of the trial (its snapshot names one once it is complete)."""
    snapshot = Path(trial_dir) / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and "checkpoint_" in snapshot.read_text()


class TrialHold:
    """The recorder's test hook (pipeline.recorder.HOLD_AT_STEP): rank 0 of a trial stops after `step`, its log and
    checkpoint reports done, until `release()`; a fault test causes its fault while the trial is known to be there.
    Pass `env()` to the `ditscale` process that starts a local Ray: its workers inherit it."""

    def __init__(self, folder, step: int):
        self.step, self.release_file = step, Path(folder) / f"release-at-step-{step}"

    def env(self) -> dict[str, str]:
        from pipeline.recorder import HOLD_AT_STEP, HOLD_FILE

        return {HOLD_AT_STEP: str(self.step), HOLD_FILE: str(self.release_file)}

    def reached(self) -> bool:
        return Path(f"{self.release_file}.reached").exists()

    def release(self) -> None:
        self.release_file.touch()


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T stopped, Z a zombie not reaped yet, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
