"""toy_scaling: a toy study long enough that FID itself falls as Gflops rise, with 2 seeds per grid point and two
EMA lengths (at most 60 minutes on 2 CPU cores).

Six models: sizes d1w48, d3w64, d6w128 (each >= 4x apart in compute per token) x patch sizes 4 and 2, so the Gflops
rank size-major from 0.57 to 83 MMACs; each trained twice (grid.seeds 0 and 1: initial weights, data order, noise),
12 trials. What makes FID move this early (measured on this kind of machine):
- the data: grey/white shapes on a plain dark background (toy style "simple"), 5 classes, shapes 45-75% of the side;
- the objective: x0-prediction with a plain MSE loss and a fixed variance. eps-prediction spends these few thousand
  steps on the noise and draws no shapes yet (FD 733 against 428 for v at 800 steps on coloured shapes); on these
  simple shapes x0 reached FD 145 against 329 for v, the only objective whose samples showed discs and rings;
- lr 2e-3 with 100 warm-up steps and cosine decay to 0.1x, batch 64, 2,000 steps;
- two EMAs at once, decays 0.995 (`fid`) and 0.999 (`ema0.999/fid`); FID of both at 1,000 and 2,000 steps: 500
  DDIM-20 samples (balanced labels, no guidance) against the classifier-feature reference (download-free); the same
  classifier reports the samples' class accuracy.
To fit in 60 minutes with two seeds, the study trains 2,000 steps (it trained 2,400 with one seed) and scores two
milestones (it scored three).
"""

from dataclasses import replace

from dit_core.diffusion import DiffusionConfig
from experiments._toy import CPU_TRIALS, TOY_FID, simple_shapes, simple_shapes_recipe
from pipeline.config import ExperimentConfig, GridConfig

EXPERIMENT = ExperimentConfig(
    name="toy_scaling",
    description="toy scaling study where FID falls with Gflops: 3 sizes x 2 patch sizes x 2 seeds, x0, CPU",
    data=simple_shapes(),
    # largest first: the longest trial starts at once and the other five share the second CPU meanwhile
    grid=GridConfig(
        presets=("DiT-d6w128/2", "DiT-d6w128/4", "DiT-d3w64/2", "DiT-d3w64/4", "DiT-d1w48/2", "DiT-d1w48/4"),
        seeds=(0, 1),
    ),
    diffusion=DiffusionConfig(prediction="x0", learn_sigma=False, loss="mse"),
    train=replace(
        simple_shapes_recipe(steps=2000, milestone_steps=(1000, 2000), ckpt_every_steps=500), ema_decays=(0.999,)
    ),
    resources=CPU_TRIALS,
    fid=TOY_FID,
)
