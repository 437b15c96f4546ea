"""Smoke test of the whole sweep machinery (used by the test suite): 2 tiny sizes x 2 patch sizes, a few steps."""

from pipeline.config import DataConfig, ExperimentConfig, GridConfig, ResourcesConfig, TrainConfig

EXPERIMENT = ExperimentConfig(
    name="smoke",
    description="seconds-long sweep over 4 tiny presets on toy shards",
    data=DataConfig(
        shards="shards/smoke",
        val_shards="shards/smoke-val",
        resolution=16,
        codec="pixel",
        source="toy",
        val_source="toy",
        samples_per_shard=100,
        toy_classes=4,
        toy_per_class=50,
        toy_val_per_class=8,
    ),
    grid=GridConfig(sizes=("Ti", "Mi"), patch_sizes=(4, 8)),
    train=TrainConfig(
        steps=30,
        global_batch_size=16,
        lr=1e-3,
        ema_decay=0.9,
        ckpt_every_steps=10,
        milestone_steps=(15, 30),
        log_every_steps=5,
        val_every_steps=15,
        val_batches=1,
        loader_workers=0,
    ),
    resources=ResourcesConfig(workers_per_trial=1, gpus_per_worker=0, cpus_per_worker=1, max_concurrent_trials=2),
)
