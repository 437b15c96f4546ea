"""toy_scaling: a toy study long enough that FID itself falls as Gflops rise (at most 60 minutes on 2 CPU cores).

Six trials: sizes Femto, Mini, Nano (each >= 4x apart in compute per token) x patch sizes 4 and 2, so the Gflops
rank size-major from 0.57 to 83 MMACs. What makes FID move this early (shared/reference/toy_feasibility.md):
- the data: grey/white shapes on a plain dark background (toy style "simple"), 5 classes, shapes 45-75% of the side;
- the objective: x0-prediction with a plain MSE loss and a fixed variance. eps-prediction spends these few thousand
  steps on the noise and draws no shapes yet; x0-prediction puts the loss on the image itself and draws them;
- lr 2e-3 with 100 warm-up steps and cosine decay to 0.1x, batch 64, 2,400 steps;
- FID on the EMA at 800, 1,600 and 2,400 steps: 500 DDIM-20 samples (balanced labels, no guidance) against the
  classifier-feature reference (download-free); the same classifier reports the samples' class accuracy.

Run a second seed as its own sweep, side by side in the same MLflow experiment:
    ditscale run toy_scaling --set name=toy_scaling_seed1 tracking.experiment_name=toy_scaling train.seed=1 fid.seed=1
"""

from pipeline.config import DataConfig, ExperimentConfig, FidConfig, GridConfig, ResourcesConfig, TrainConfig

EXPERIMENT = ExperimentConfig(
    name="toy_scaling",
    description="toy scaling study where FID falls with Gflops: 3 sizes x 2 patch sizes, x0-prediction, CPU",
    data=DataConfig(
        shards="shards/simple16",
        val_shards="shards/simple16-val",
        resolution=16,
        codec="pixel",
        source="toy",
        val_source="toy",
        samples_per_shard=1000,
        toy_classes=5,
        toy_per_class=1000,
        toy_val_per_class=40,
        toy_style="simple",
    ),
    # largest first: the longest trial starts at once and the other five share the second CPU meanwhile
    grid=GridConfig(presets=("DiT-Nano/2", "DiT-Nano/4", "DiT-Mini/2", "DiT-Mini/4", "DiT-Femto/2", "DiT-Femto/4")),
    train=TrainConfig(
        steps=2400,
        global_batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        lr_schedule="cosine",
        min_lr_ratio=0.1,
        ema_decay=0.995,
        prediction="x0",
        learn_sigma=False,
        loss="mse",
        ckpt_every_steps=400,
        milestone_steps=(800, 1600, 2400),
        log_every_steps=50,
        val_every_steps=800,
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
