"""Smoke test of the whole sweep machinery (used by the test suite): 2 tiny sizes x 2 patch sizes, a few steps."""

from experiments._toy import CPU_TRIALS, RESOLUTION, toy_data
from pipeline.config import ExperimentConfig, GridConfig, TrainConfig
from pipeline.toy import ToyDataConfig

EXPERIMENT = ExperimentConfig(
    name="smoke",
    description="seconds-long sweep over 4 tiny presets on toy shards",
    data=toy_data(
        "smoke",
        ToyDataConfig(num_classes=4, per_class=50, resolution=RESOLUTION),
        val_per_class=8,
        samples_per_shard=100,
    ),
    grid=GridConfig(sizes=("d2w64", "d4w128"), patch_sizes=(4, 8)),
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
    resources=CPU_TRIALS,
)
