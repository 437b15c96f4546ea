"""Quickstart: a small scaling study on the built-in toy data that shows FID falling with compute, in about 10 minutes
on a 2-core laptop.

The recipe is the one `toy_variants` measured to converge fastest on the CPU (docs/results.md), its "modern" design:
flow matching on the linear path with a velocity target and logit-normal timesteps, 2D RoPE, SwiGLU, RMSNorm and
QK-norm. At 1,600 steps it scored FID 16 against the 2023 DiT's 60 on the largest model, and its FID fell with Gflops
at every size (exponent -0.47 against -0.16). The paper's own recipe stays in `paper_grid` (and `toy_variants`).
- data: grey/white shapes on a plain dark background at 16 px, 5 classes (the toy studies' `simple16`), pixel space;
- four models whose Gflops are each >= 4x apart, d1w48/4, d3w64/4, d3w64/2, d6w128/4 (0.57 to 20 MMACs; d6w128/2
  would need twice the time), largest first so that the longest trial never trains alone at the end;
- 1,400 steps at batch 64, lr 2e-3 with 100 warm-up steps and cosine decay to 0.1x, EMA 0.995;
- FID of the EMA at 700 and 1,400 steps from 500 samples of Heun's ODE over 10 steps with classifier-free guidance
  2 (balanced labels), scored with the download-free classifier extractor, which also reports the samples' class
  accuracy. Guidance is what makes the largest model's samples recognisable within this budget: without it,
  `toy_variants` measured 69% class accuracy for d6w128/4 at 1,600 steps.
"""

from dataclasses import replace

from dit_core.config import DiTOptions
from dit_core.diffusion import DiffusionConfig
from experiments._toy import CPU_TRIALS, MODERN, TOY_FID, simple_shapes, simple_shapes_recipe
from pipeline.config import ExperimentConfig, GridConfig

EXPERIMENT = ExperimentConfig(
    name="quickstart",
    description="toy scaling study: 4 tiny DiTs (modern recipe: flow, RoPE, SwiGLU, RMSNorm, QK-norm) on 16 px shapes",
    data=simple_shapes(),
    grid=GridConfig(presets=("DiT-d6w128/4", "DiT-d3w64/2", "DiT-d3w64/4", "DiT-d1w48/4")),
    model=DiTOptions(**MODERN["model"]),
    diffusion=DiffusionConfig(**MODERN["diffusion"]),
    train=simple_shapes_recipe(steps=1400, milestone_steps=(700, 1400), ckpt_every_steps=350),
    resources=CPU_TRIALS,
    fid=replace(TOY_FID, **MODERN["fid"], cfg_scale=2.0),
)
