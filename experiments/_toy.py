"""What the toy studies share: toy images in pixel space at 16 px (no VAE, no download), one CPU worker per trial
and two trials at a time (a 2-core machine) with a FID sampling actor beside them, and the download-free FID
protocol."""

from pipeline.codecs import CodecConfig
from pipeline.config import DataConfig, FidConfig, ResourcesConfig, TrainConfig
from pipeline.prepare import PrepareConfig
from pipeline.toy import ToyDataConfig

RESOLUTION = 16  # pixels, for the toy images and the shards alike

# Two trials at a time, each one worker on 0.75 of a CPU (one torch thread), so that the FID sampling actor (0.5 of a
# CPU, below) fits beside them on 2 CPUs: `ditscale run` scores each milestone while the other trials train.
CPU_TRIALS = ResourcesConfig(workers_per_trial=1, gpus_per_worker=0, cpus_per_worker=0.75, max_concurrent_trials=2)

# 500 DDIM-20 samples per checkpoint with balanced labels and no guidance, scored with the classifier extractor
# (trained for a fixed 1,000 steps, so that every machine gets the same extractor; about 25 s on an idle 2-core
# machine), whose logits also give the samples' class accuracy. One sampling actor on half a CPU, beside the trials,
# scoring each milestone as it lands ("spare"). On CPUs even where GPUs are (gpus_per_worker=0, as the trials): the
# toy studies' documented numbers are fp32 CPU numbers, bitwise reproducible with one thread per actor; a machine
# with GPUs reproduces them as they are (`--set fid.gpus_per_worker=1` samples on a GPU, in bf16, other numbers).
TOY_FID = FidConfig(
    num_samples=500,
    sampler="ddim",
    sampling_steps=20,
    labels="balanced",
    extractor="ditscale-classifier",
    classifier_steps=1000,
    slice_size=125,
    batch_size=125,
    workers=1,
    cpus_per_worker=0.5,
    gpus_per_worker=0,
    schedule="spare",
)


def toy_data(name: str, toy: ToyDataConfig, val_per_class: int, samples_per_shard: int = 1000) -> DataConfig:
    """Shards shards/<name> and shards/<name>-val made from toy images (validation: seed + 1)."""
    return DataConfig(
        shards=f"shards/{name}",
        val_shards=f"shards/{name}-val",
        source="toy",
        val_source="toy",
        prepare=PrepareConfig(
            resolution=RESOLUTION, codec=CodecConfig(kind="pixel"), samples_per_shard=samples_per_shard
        ),
        toy=toy,
        toy_val_per_class=val_per_class,
    )


def simple_shapes() -> DataConfig:
    """The toy studies' data: 5,000 grey/white shapes (disc, square, triangle, plus, ring) on plain dark backgrounds
    at 16 px, 200 validation images; shards shards/simple16, shared by toy_scaling, toy_variants and the quickstart."""
    return toy_data(
        "simple16",
        ToyDataConfig(num_classes=5, per_class=1000, resolution=RESOLUTION, style="simple"),
        val_per_class=40,
    )


def simple_shapes_recipe(steps: int, milestone_steps: tuple[int, ...], ckpt_every_steps: int) -> TrainConfig:
    """What the toy studies on `simple_shapes` train with: batch 64, AdamW lr 2e-3 with 100 warm-up steps and cosine
    decay to 0.1x, EMA 0.995, validation at the milestones, in-process data loading."""
    return TrainConfig(
        steps=steps,
        global_batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        lr_schedule="cosine",
        min_lr_ratio=0.1,
        ema_decay=0.995,
        ckpt_every_steps=ckpt_every_steps,
        milestone_steps=milestone_steps,
        log_every_steps=50,
        val_every_steps=milestone_steps[0],
        val_batches=2,
        loader_workers=0,
    )


# The modern design `toy_variants` measured against the 2023 DiT (and the quickstart trains): flow matching with a
# velocity target and logit-normal timesteps (SiT, SD3), 2D RoPE, SwiGLU, RMSNorm, QK-norm (LightningDiT), sampled
# with Heun's ODE over 10 steps (20 network evaluations, as DDIM-20). As a variant: {section: {field: value}}.
MODERN = {
    "model": {"positions": "rope", "mlp": "swiglu", "norm": "rmsnorm", "qk_norm": True},
    "diffusion": {
        "objective": "flow",
        "prediction": "v",
        "learn_sigma": False,
        "loss": "mse",
        "timestep_sampling": "logit_normal",
    },
    "fid": {"sampler": "heun", "sampling_steps": 10},
}
