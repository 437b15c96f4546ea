"""Quickstart: a small scaling study on the built-in toy data that finishes on a 2-core laptop.

Toy shapes at 16 px in pixel space (no VAE, no downloads); two tiny sizes (d2w48, d6w128) x patch sizes 4 and 2,
whose Gflops are each >= 4x apart (1.1, 4.5, 20, 83 MMACs); one CPU worker per trial, two trials at a time; EMA
milestones at 300 and 600 steps scored with the download-free classifier extractor (500 DDIM-20 samples each); then
the fits and figures.
"""

from experiments._toy import CPU_TRIALS, RESOLUTION, TOY_FID, toy_data
from pipeline.config import ExperimentConfig, GridConfig, TrainConfig
from pipeline.toy import ToyDataConfig

EXPERIMENT = ExperimentConfig(
    name="quickstart",
    description="toy scaling study: 2 sizes x 2 patch sizes on 16 px toy shapes, CPU",
    data=toy_data("toy16", ToyDataConfig(num_classes=10, per_class=500, resolution=RESOLUTION), val_per_class=20),
    grid=GridConfig(presets=("DiT-d2w48/4", "DiT-d2w48/2", "DiT-d6w128/4", "DiT-d6w128/2")),
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
    resources=CPU_TRIALS,
    fid=TOY_FID,
)
