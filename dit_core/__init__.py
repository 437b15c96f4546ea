"""dit_core: a DiT library in plain single-device PyTorch (no Ray, MLflow or pipeline code).

from dit_core import DiT, GaussianDiffusion, DDPMSampler, make_denoiser
model = DiT.from_preset("DiT-XL/2")                         # 675M params, 118.6 Gflops
diffusion = GaussianDiffusion()                             # linear betas, eps + learned sigma, hybrid loss
losses = diffusion.training_losses(model, x0, t, y)         # {"loss", "mse", "vb"}
step = TrainStep(model, diffusion, adamw(model))            # forward, loss, backward, AdamW (+ clip, EMA, bf16)
x = DDPMSampler(respacing="250").sample(make_denoiser(model.eval(), num_timesteps=1000), noise, y)
"""

from dit_core.checkpoint import load_checkpoint, model_config_from_checkpoint, restore, save_checkpoint
from dit_core.config import PRESETS, SIZES, DiTConfig, DiTOptions, dit_config, parse_preset
from dit_core.diffusion import DiffusionConfig, GaussianDiffusion, sample_timesteps, space_timesteps
from dit_core.ema import create_ema, unwrap_model, update_ema
from dit_core.flops import forward_macs, gflops, param_count, train_mfu, training_compute
from dit_core.model import DiT
from dit_core.samplers import DDIMSampler, DDPMSampler, DiffusersSampler, diffusers_scheduler, make_denoiser
from dit_core.training import TrainStep, adamw

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DiT",
    "DiTConfig",
    "DiTOptions",
    "DiffusersSampler",
    "DiffusionConfig",
    "GaussianDiffusion",
    "PRESETS",
    "SIZES",
    "TrainStep",
    "adamw",
    "create_ema",
    "diffusers_scheduler",
    "dit_config",
    "forward_macs",
    "gflops",
    "load_checkpoint",
    "make_denoiser",
    "model_config_from_checkpoint",
    "param_count",
    "parse_preset",
    "restore",
    "sample_timesteps",
    "save_checkpoint",
    "space_timesteps",
    "train_mfu",
    "training_compute",
    "unwrap_model",
    "update_ema",
]
