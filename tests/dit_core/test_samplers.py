"""Samplers with an oracle denoiser on Gaussian data: they must recover the data's mean and variance."""

import math

import pytest
import torch

from dit_core.diffusion import DiffusionConfig, GaussianDiffusion
from dit_core.samplers import (
    DDIMSampler,
    DDPMSampler,
    DiffusersSampler,
    FlowSampler,
    diffusers_scheduler,
    make_denoiser,
)
from tests.dit_core.builders import tiny_dit

MU, SIGMA = 0.5, 0.8  # data: x0 ~ N(MU, SIGMA^2) elementwise
SHAPE = (2000, 2, 2, 2)  # 16,000 scalar samples


def oracle(config: DiffusionConfig, variance_value: float = -1.0):
    """Exact E[eps | x_t] (or x0 / v) for Gaussian data; constant v for the variance channels."""
    alpha_bar = GaussianDiffusion(config).alpha_bar

    def denoise(x, t, y):
        ab = alpha_bar[t.long()].float().view(-1, 1, 1, 1)
        x0_mean = MU + SIGMA**2 * ab.sqrt() * (x - ab.sqrt() * MU) / (ab * SIGMA**2 + 1 - ab)
        eps = (x - ab.sqrt() * x0_mean) / (1 - ab).sqrt()
        pred = {"eps": eps, "x0": x0_mean, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0_mean}[config.prediction]
        if config.learn_sigma:
            return torch.cat([pred, torch.full_like(pred, variance_value)], dim=1)
        return pred

    return denoise


def draw(sampler, config, seed=0, variance_value=-1.0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=g)
    y = torch.zeros(SHAPE[0], dtype=torch.long)
    return sampler.sample(oracle(config, variance_value), noise, y, generator=g)


def variance_error(x) -> float:
    return abs(x.var().item() / SIGMA**2 - 1)


def assert_matches_data(x, var_rel):
    assert x.mean().item() == pytest.approx(MU, abs=0.025)  # standard error of the mean: 0.0063
    assert variance_error(x) < var_rel


def test_ddpm_learned_variance_recovers_gaussian_and_converges_with_steps():
    config = DiffusionConfig()
    errors = [variance_error(draw(DDPMSampler(config, steps), config)) for steps in ("50", "250", "1000")]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.05  # the paper's 250 steps
    assert_matches_data(draw(DDPMSampler(config, "1000"), config), var_rel=0.02)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_recovers_gaussian_and_converges_with_steps(prediction):
    config = DiffusionConfig(prediction=prediction, learn_sigma=False, loss="mse")
    errors = [variance_error(draw(DDIMSampler(config, f"ddim{n}"), config)) for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert_matches_data(draw(DDIMSampler(config, "ddim200"), config), var_rel=0.02)


def test_ddim_with_eta_one_recovers_gaussian():
    config = DiffusionConfig()
    assert_matches_data(draw(DDIMSampler(config, "ddim200", eta=1.0), config), var_rel=0.03)


def test_ddim_equals_diffusers_ddim_scheduler():
    """Deterministic DDIM: our sampler and diffusers' DDIMScheduler take the same steps to the same result."""
    config = DiffusionConfig()
    ours = draw(DDIMSampler(config, "ddim50"), config)
    theirs = draw(DiffusersSampler(diffusers_scheduler("DDIMScheduler", config), 50), config)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_learned_variance_extremes_are_the_fixed_variances():
    """v = -1 is beta_tilde (fixed small): the sample equals the fixed-variance sampler's with the same noise."""
    learned = DiffusionConfig()
    fixed = DiffusionConfig(learn_sigma=False, loss="mse")
    a = draw(DDPMSampler(learned, "50"), learned, variance_value=-1.0)
    b = draw(DDPMSampler(fixed, "50"), fixed)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    c = draw(DDPMSampler(learned, "50"), learned, variance_value=1.0)  # beta: more noise
    assert c.var() > a.var()


@pytest.mark.parametrize(
    "name, steps",
    [("DDPMScheduler", 1000), ("DDIMScheduler", 200), ("DPMSolverMultistepScheduler", 25)],
)
def test_diffusers_schedulers_drive_the_oracle(name, steps):
    config = DiffusionConfig()
    sampler = DiffusersSampler(diffusers_scheduler(name, config), steps)
    assert sampler.passes_variance == (name == "DDPMScheduler")
    assert_matches_data(draw(sampler, config), var_rel=0.02)


def test_same_seed_same_samples():
    config = DiffusionConfig()
    for sampler in (DDPMSampler(config, "20"), DDIMSampler(config, "ddim10", eta=0.5)):
        a, b = draw(sampler, config, seed=7), draw(sampler, config, seed=7)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, draw(sampler, config, seed=8))


def test_make_denoiser_with_a_dit_and_guidance():
    torch.manual_seed(0)
    model = tiny_dit("DiT-d2w64/4", num_classes=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    plain = DDIMSampler(respacing="ddim10").sample(make_denoiser(model, num_timesteps=1000), noise, y)
    guided = DDIMSampler(respacing="ddim10").sample(make_denoiser(model, cfg_scale=4.0, num_timesteps=1000), noise, y)
    assert plain.shape == guided.shape == noise.shape and torch.isfinite(guided).all()
    assert not torch.allclose(plain, guided)
    same = DDIMSampler(respacing="ddim10").sample(make_denoiser(model, cfg_scale=1.0, num_timesteps=1000), noise, y)
    torch.testing.assert_close(plain, same)


class RecordingDiT:
    """Stands in for a DiT: outputs zeros, and records the model times of its plain and of its guided passes."""

    def __init__(self, out_channels: int):
        self.out_channels = out_channels
        self.plain: set[float] = set()
        self.guided: set[float] = set()

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])

    def __call__(self, x, t, y):
        self.plain.update(t.tolist())
        return self.zeros(x)

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        self.guided.update(t.tolist())
        return self.zeros(x)


@pytest.mark.parametrize("num_timesteps", [500, 1000])
def test_guidance_interval_guides_exactly_the_steps_at_noise_levels_inside_it(num_timesteps):
    """guidance_interval (0.2, 0.6) names noise levels: t / T for DDPM, the path time s for a flow (model time s T),
    whatever T is. The steps inside, ends included, take the guided pass and no others do."""
    T, y = num_timesteps, torch.zeros(2, dtype=torch.long)
    ddpm = DiffusionConfig(num_timesteps=T)
    model = RecordingDiT(out_channels=4)  # eps and the learned variance channels
    denoise = make_denoiser(model, cfg_scale=4.0, guidance_interval=(0.2, 0.6), num_timesteps=T)
    DDPMSampler(ddpm, respacing="ddim50").sample(denoise, torch.randn(2, 2, 2, 2), y)
    stride = T // 50  # the respaced chain visits 0, stride, ..., T - stride: 0.2 T and 0.6 T among them
    assert model.guided == set(range(T // 5, 3 * T // 5 + 1, stride))
    assert model.plain == set(range(0, T, stride)) - model.guided

    flow = DiffusionConfig(objective="flow", prediction="v", learn_sigma=False, loss="mse", num_timesteps=T)
    model = RecordingDiT(out_channels=2)
    denoise = make_denoiser(model, cfg_scale=4.0, guidance_interval=(0.2, 0.6), num_timesteps=T)
    FlowSampler(flow, "heun", num_steps=8).sample(denoise, torch.randn(2, 2, 2, 2), y)  # s = 1, 7/8, ..., 0
    assert {t / T for t in model.guided} == {0.25, 0.375, 0.5}
    assert {t / T for t in model.plain} == {0.0, 0.125, 0.625, 0.75, 0.875, 1.0}


def test_make_denoiser_refuses_a_timestep_count_below_one():
    with pytest.raises(ValueError, match="num_timesteps"):
        make_denoiser(RecordingDiT(4), num_timesteps=0)


def test_unknown_diffusers_scheduler():
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        diffusers_scheduler("NoSuchScheduler")
    assert math.isfinite(diffusers_scheduler("EulerDiscreteScheduler").init_noise_sigma)
