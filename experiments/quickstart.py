"""Quickstart: a small scaling study on the built-in toy data that finishes on a 2-core laptop.

Toy shapes at 16 px in pixel space (no VAE, no downloads); two tiny sizes (Pico, Nano) x patch sizes 4 and 2, whose
Gflops are each >= 4x apart; one CPU worker per trial, two trials at a time; EMA milestones at 300 and 600 steps
scored with the download-free classifier extractor (500 DDIM-20 samples each); then the fits and figures.
"""

from pipeline.config import DataConfig, ExperimentConfig, FidConfig, GridConfig, ResourcesConfig, TrainConfig

EXPERIMENT = ExperimentConfig(
    name="quickstart",
    description="toy scaling study: 2 sizes x 2 patch sizes on 16 px toy shapes, CPU",
    data=DataConfig(
        shards="shards/toy16",
        val_shards="shards/toy16-val",
        resolution=16,
        codec="pixel",
        source="toy",
        val_source="toy",
        samples_per_shard=1000,
        toy_classes=10,
        toy_per_class=500,
        toy_val_per_class=20,
    ),
    grid=GridConfig(presets=("DiT-Pico/4", "DiT-Pico/2", "DiT-Nano/4", "DiT-Nano/2")),
    train=TrainConfig(
        steps=600,
        global_batch_size=64,
        lr=1e-3,
        warmup_steps=50,
        lr_schedule="cosine",
        ema_decay=0.99,
        ckpt_every_steps=200,
        milestone_steps=(300, 600),
        log_every_steps=50,
        val_every_steps=300,
        val_batches=2,
        loader_workers=0,
    ),
    resources=ResourcesConfig(workers_per_trial=1, gpus_per_worker=0, cpus_per_worker=1, max_concurrent_trials=2),
    fid=FidConfig(
        num_samples=500,
        sampler="ddim",
        sampling_steps=20,
        labels="balanced",
        extractor="ditscale-classifier",
        classifier_seconds=25,
        slice_size=125,
        batch_size=125,
    ),
)
