"""Device discipline: a training step, every sampler, guidance with an interval and the validation loss run with the
model and all inputs on the `meta` device, and no op inside them reads or makes a tensor on another device. On a GPU
such a tensor is a host-to-device copy or a synchronisation at every step (a `torch.tensor(...)` scalar, a table
gathered on the host, a `torch.arange` without `device=`).

What is built once, outside a step, may start on the host: the coefficient tables of GaussianDiffusion are computed
in float64 on the CPU and moved once (`.to(device)`: TrainStep at construction, a sampler at its first call; here
before the check). The diffusers bridge is not run: diffusers' schedulers keep their tables on the host and index
them with the timestep's value (`alphas_cumprod[timestep]`, `.item()`, `nonzero`), which a meta tensor does not have.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dit_core.config import DiTOptions
from dit_core.diffusion import DiffusionConfig
from dit_core.ema import create_ema
from dit_core.flow import make_process
from dit_core.samplers import DDIMSampler, DDPMSampler, FlowSampler, make_denoiser
from dit_core.training import TrainStep, adamw
from tests.dit_core.builders import tiny_dit

META = torch.device("meta")
DDPM = DiffusionConfig()  # eps + learned variance, hybrid loss
FLOW = DiffusionConfig(objective="flow", prediction="v", learn_sigma=False, loss="mse")
# a 1-block DiT on 4 x 4 latents of 2 channels, label dropout on (its path runs too); built on the CPU, moved to meta
MODEL = dict(
    preset="DiT-d1w48/2", options=DiTOptions(class_dropout_prob=0.1), input_size=4, in_channels=2, num_classes=3
)


class OnlyMeta(TorchDispatchMode):
    """Raises on any op that receives or returns a tensor off the meta device (python numbers are not tensors)."""

    def __init__(self):
        super().__init__()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for value in tree_flatten((args, kwargs, out))[0]:
                if isinstance(value, torch.Tensor) and value.device != META:
                    raise AssertionError(f"{func} met a {value.device} tensor {tuple(value.shape)} {value.dtype}")
        return out


def unchecked_optimizer(optimizer: torch.optim.Optimizer, guard: OnlyMeta) -> torch.optim.Optimizer:
    """Leave `optimizer.step` unchecked: torch's AdamW keeps its step count on the host unless fused or capturable
    (adamw() fuses it on CUDA, which meta is not); that is torch's design, not a dit_core step's."""
    optimizer.register_step_pre_hook(lambda *_: setattr(guard, "paused", True))
    optimizer.register_step_post_hook(lambda *_: setattr(guard, "paused", False))
    return optimizer


def batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2, 4, 4, device=META), torch.zeros(n, dtype=torch.long, device=META)


@pytest.mark.parametrize("config, options", [(DDPM, dict(grad_clip=1.0)), (FLOW, dict())], ids=["ddpm", "flow"])
def test_train_step_stays_on_the_device(config, options):
    model = tiny_dit(**MODEL, learn_sigma=config.learn_sigma).to(META)
    guard = OnlyMeta()
    step = TrainStep(
        model, make_process(config), unchecked_optimizer(adamw(model), guard), create_ema(model), **options
    )
    x0, y = batch()
    with guard:
        out = step(x0, y, measure_grad_norm=True)
    assert {v.device for v in out.values()} == {META} and "grad_norm" in out


SAMPLERS = {
    "ddpm-learned-variance": (DDPM, lambda: DDPMSampler(DDPM, respacing="5")),
    "ddim": (DDPM, lambda: DDIMSampler(DDPM, respacing="ddim5", eta=0.5)),
    "flow-euler": (FLOW, lambda: FlowSampler(FLOW, "euler", num_steps=4)),
    "flow-heun": (FLOW, lambda: FlowSampler(FLOW, "heun", num_steps=4)),
    "flow-sde": (FLOW, lambda: FlowSampler(FLOW, "sde", num_steps=4)),
}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("guidance_interval", [None, (0.2, 0.6)], ids=["always-guided", "guidance-interval"])
def test_sampler_with_guidance_stays_on_the_device(name, guidance_interval):
    config, make_sampler = SAMPLERS[name]
    model = tiny_dit(**MODEL, learn_sigma=config.learn_sigma).to(META).eval()
    sampler = make_sampler()
    if isinstance(sampler, DDPMSampler | DDIMSampler):
        sampler.diffusion.to(META)  # the host-built tables, moved once
    denoise = make_denoiser(
        model, cfg_scale=2.0, guidance_interval=guidance_interval, num_timesteps=config.num_timesteps
    )
    noise, y = batch()
    with OnlyMeta():
        x = sampler.sample(denoise, noise, y)
    assert x.device == META and x.shape == noise.shape


@pytest.mark.parametrize("config", [DDPM, FLOW], ids=["ddpm", "flow"])
def test_validation_loss_stays_on_the_device(config):
    model = tiny_dit(**MODEL, learn_sigma=config.learn_sigma).to(META).eval()
    process = make_process(config).to(META)
    x0, y = batch()
    t = process.spread_timesteps(x0.shape[0]).to(META)
    with OnlyMeta(), torch.no_grad():
        losses = process.training_losses(model, x0, t, y)
    assert {v.device for v in losses.values()} == {META}


def test_the_check_catches_a_host_scalar_inside_a_step():
    model = tiny_dit(**MODEL, learn_sigma=FLOW.learn_sigma).to(META).eval()
    denoise = make_denoiser(model, num_timesteps=FLOW.num_timesteps)
    noise, y = batch()
    with OnlyMeta(), pytest.raises(AssertionError, match="met a cpu tensor"):
        FlowSampler(FLOW, "euler", 2).sample(lambda x, t, y: denoise(x, t, y) * torch.tensor(1.0), noise, y)
