"""toy_variants: the 2023 DiT against a modern design, each scaled over the same grid (at most 60 minutes on 2 cores).

Two variants x sizes d1w48, d3w64, d6w128 (each >= 4x apart in compute per token) x patch sizes 4 and 2: twelve
trials, every one trained for real on the toy shapes of `toy_scaling`.
- dit2023: the paper's design exactly: eps-prediction with learned variance (hybrid loss), fixed 2D sin-cos
  positions, GELU MLP, LayerNorm, no QK-norm; sampled with DDIM, 20 steps.
- modern: flow matching on the linear path with a velocity target and logit-normal(0, 1) timesteps (SiT, SD3),
  2D RoPE, SwiGLU, RMSNorm and QK-norm (LightningDiT); sampled with Heun's ODE, 10 steps = 20 network evaluations,
  the same sampling compute as dit2023's DDIM-20.
Both share everything else: 1,600 steps at batch 64, lr 2e-3 with 100 warm-up steps and cosine decay to 0.1x, EMA
0.995, FID of 500 samples (balanced labels, no guidance) at 800 and 1,600 steps with the download-free classifier
extractor, which also reports the samples' class accuracy. The analysis fits each variant on its own.
"""

from dit_core.diffusion import DiffusionConfig
from experiments._toy import CPU_TRIALS, MODERN, TOY_FID, simple_shapes, simple_shapes_recipe
from pipeline.config import ExperimentConfig, GridConfig

EXPERIMENT = ExperimentConfig(
    name="toy_variants",
    description="the 2023 DiT against flow + RoPE + SwiGLU + RMSNorm + QK-norm over 3 sizes x 2 patch sizes, CPU",
    data=simple_shapes(),
    # largest first, so that the longest trials never run alone at the end
    grid=GridConfig(
        presets=("DiT-d6w128/2", "DiT-d6w128/4", "DiT-d3w64/2", "DiT-d3w64/4", "DiT-d1w48/2", "DiT-d1w48/4"),
        variants={"dit2023": {}, "modern": MODERN},
    ),
    diffusion=DiffusionConfig(),  # the paper's objective, for dit2023
    train=simple_shapes_recipe(steps=1600, milestone_steps=(800, 1600), ckpt_every_steps=400),
    resources=CPU_TRIALS,
    fid=TOY_FID,
)
