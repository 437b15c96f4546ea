"""The paper's scaling grid (Table 4): DiT-S/B/L/XL x patch 2/4/8 on ImageNet 256 with the paper's recipe.

ImageNet train folder -> SD-VAE (ft-EMA) latents 32x32x4; AdamW lr 1e-4 constant, no weight decay, batch 256,
400K steps, EMA 0.9999, eps prediction with learned sigma (hybrid loss; the default DiffusionConfig), no gradient
clipping, bf16 autocast, torch.compile. EMA checkpoints for FID at 50K, 100K, 200K, 300K and 400K steps, scored with
FID-50K (DDPM-250, no guidance; the default FidConfig) and drawn beside the paper's Table 4.
"""

from analysis.config import AnalysisConfig
from pipeline.codecs import CodecConfig
from pipeline.config import DataConfig, ExperimentConfig, GridConfig, ResourcesConfig, TrainConfig
from pipeline.prepare import PrepareConfig

EXPERIMENT = ExperimentConfig(
    name="paper_grid",
    description="DiT scaling grid of Table 4: 12 models, ImageNet 256, 400K steps",
    data=DataConfig(
        shards="shards/imagenet256-sdvae-ema",
        source=None,  # set data.source=/path/to/imagenet/train for `ditscale run` to prepare the shards
        prepare=PrepareConfig(
            resolution=256, codec=CodecConfig(kind="vae", vae="stabilityai/sd-vae-ft-ema"), samples_per_shard=5000
        ),
    ),
    grid=GridConfig(sizes=("S", "B", "L", "XL"), patch_sizes=(2, 4, 8)),
    train=TrainConfig(
        steps=400_000,
        global_batch_size=256,
        lr=1e-4,
        ema_decay=0.9999,
        ckpt_every_steps=10_000,
        milestone_steps=(50_000, 100_000, 200_000, 300_000, 400_000),
        log_every_steps=100,
        val_every_steps=10_000,
        loader_workers=4,
        compile=True,  # model and loss; the official XL/2 goes from 354 to 520 img/s on an H200 compiled
    ),
    resources=ResourcesConfig(workers_per_trial=8, gpus_per_worker=1, cpus_per_worker=4),
    analysis=AnalysisConfig(reference="dit-table4"),
)
