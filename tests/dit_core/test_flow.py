"""Flow matching: the loss by hand, timestep densities, the ODE/SDE samplers on Gaussian data, guidance interval."""

import math

import pytest
import torch

from dit_core.config import DiTOptions
from dit_core.diffusion import DiffusionConfig
from dit_core.flow import FlowMatching, make_process
from dit_core.samplers import DDIMSampler, FlowSampler, diffusers_scheduler, make_denoiser
from dit_core.training import TrainStep, adamw
from tests.dit_core.builders import tiny_dit

FLOW = DiffusionConfig(objective="flow", prediction="v", learn_sigma=False, loss="mse")
LOGIT_NORMAL = DiffusionConfig(
    objective="flow", prediction="v", learn_sigma=False, loss="mse", timestep_sampling="logit_normal",
    logit_normal_mean=0.5, logit_normal_std=0.8,
)  # fmt: skip


def test_flow_loss_against_a_hand_computation():
    flow = FlowMatching(FLOW)
    x0 = torch.tensor([[[[1.0, -2.0]]]])  # (1, 1, 1, 2)
    eps = torch.tensor([[[[0.5, 0.5]]]])
    t = torch.tensor([0.25])
    # x_t = 0.75 x0 + 0.25 eps = [0.875, -1.375]; target eps - x0 = [-0.5, 2.5]
    torch.testing.assert_close(flow.q_sample(x0, t, eps), torch.tensor([[[[0.875, -1.375]]]]))
    seen = {}

    def model(x, t_model, y):
        seen["t"] = t_model
        return torch.tensor([[[[0.0, 2.0]]]])

    out = flow.training_losses(model, x0, t, torch.tensor([0]), eps)
    assert out["loss"].item() == pytest.approx(((0 + 0.5) ** 2 + (2 - 2.5) ** 2) / 2)
    assert seen["t"].item() == pytest.approx(250.0)  # the DiT sees t * 1000


def test_timestep_densities_have_the_right_moments():
    g = torch.Generator().manual_seed(0)
    t = make_process(LOGIT_NORMAL).sample_timesteps(200_000, generator=g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    u = make_process(FLOW).sample_timesteps(200_000, generator=g)
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.002)
    assert 0 < float(u.min()) and float(u.max()) < 1


MU, S = 0.7, 0.3  # data x_0 ~ N(MU, S^2) in every dimension


def exact_velocity(x: torch.Tensor, t_model: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E[eps - x_0 | x_t = x] for Gaussian data on the linear path."""
    t = (t_model / 1000).view(-1, 1, 1, 1)
    var, mean = (1 - t) ** 2 * S**2 + t**2, (1 - t) * MU
    e_x0 = MU + (1 - t) * S**2 * (x - mean) / var
    e_eps = t * (x - mean) / var
    return e_eps - e_x0


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_samplers_recover_gaussian_data_with_error_falling_as_steps_grow(method):
    noise = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = MU + S * noise  # the flow map of Gaussian data is affine: x_1 -> MU + S x_1
    errors = []
    for steps in (4, 16, 64, 256):
        x = FlowSampler(FLOW, method, steps).sample(exact_velocity, noise, torch.zeros(4000, dtype=torch.long))
        errors.append((x - exact).abs().max().item())
    # the last, finest run: the data's mean and spread
    assert x.mean().item() == pytest.approx(exact.mean().item(), abs=1e-3)
    assert x.std().item() == pytest.approx(exact.std().item(), rel=0.015)
    assert errors == sorted(errors, reverse=True)
    ratio = 4 if method == "euler" else 16  # first / second order: 4x the steps cut the error 4x / 16x
    assert all(a / b > 0.75 * ratio for a, b in zip(errors[1:], errors[2:]))  # once in the asymptotic regime
    assert errors[-1] < (0.02 if method == "euler" else 1e-4)


def test_heun_beats_euler_at_equal_steps():
    noise = torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(500, dtype=torch.long)
    err = {
        m: (FlowSampler(FLOW, m, 8).sample(exact_velocity, noise, y) - (MU + S * noise)).abs().max()
        for m in ("euler", "heun")
    }
    assert err["heun"] < err["euler"] / 5


def test_sde_sampler_recovers_gaussian_data():
    noise = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    x = FlowSampler(FLOW, "sde", 200).sample(exact_velocity, noise, torch.zeros(20_000, dtype=torch.long), g)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    assert (x - (MU + S * noise)).abs().mean() > 0.01  # it is stochastic: not the ODE's deterministic map
    again = FlowSampler(FLOW, "sde", 200).sample(
        exact_velocity, noise, torch.zeros(20_000, dtype=torch.long), torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(x, again)  # and reproducible from its generator


def test_sde_step_follows_sits_sigma_diffusion_form():
    """SiT's Euler-Maruyama with diffusion form "sigma" and norm k: D = k t, x += drift h + sqrt(2 D h) z. So a step
    from t is x - h (v + k eps_hat) + sqrt(2 k t h) z, eps_hat = x + (1 - t) v, with z the generator's next draw."""
    k, c, steps = 0.7, 0.3, 4  # diffusion_norm, a constant velocity v = c, h = 1/4
    seen = []

    def constant_velocity(x, t_model, y):
        seen.append(x.clone())
        return torch.full_like(x, c)

    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    FlowSampler(FLOW, "sde", steps, diffusion_norm=k).sample(
        constant_velocity, noise, torch.zeros(3, dtype=torch.long), torch.Generator().manual_seed(1)
    )
    g, x, h = torch.Generator().manual_seed(1), noise, 1 / steps
    for i, t in enumerate((1.0, 0.75, 0.5)):  # the steps that add noise (the last one does not)
        eps_hat = x + (1 - t) * c
        x = x - h * (c + k * eps_hat) + math.sqrt(2 * k * t * h) * torch.randn(x.shape, generator=g)
        torch.testing.assert_close(seen[i + 1], x)


def test_guidance_interval_leaves_the_steps_outside_it_unguided():
    torch.manual_seed(0)
    model = tiny_dit("DiT-d1w48/2", DiTOptions(), input_size=4, in_channels=1, num_classes=3, learn_sigma=False).eval()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    denoise = make_denoiser(model, cfg_scale=3.0, guidance_interval=(0.2, 0.6), num_timesteps=1000)
    with torch.no_grad():
        for level in (0.1, 0.19, 0.7, 0.95):  # outside: the conditional pass alone
            t = torch.full((2,), level * 1000)
            torch.testing.assert_close(denoise(x, t, y), model(x, t, y))
        for level in (0.2, 0.4, 0.6):  # inside: guided
            t = torch.full((2,), level * 1000)
            torch.testing.assert_close(denoise(x, t, y), model.forward_with_cfg(x, t, y, 3.0))
            assert not torch.allclose(denoise(x, t, y), model(x, t, y))
        t = torch.tensor([100.0, 400.0])  # a mixed batch: per sample
        out = denoise(x, t, y)
        torch.testing.assert_close(out[0], model(x, t, y)[0])
        torch.testing.assert_close(out[1], model.forward_with_cfg(x, t, y, 3.0)[1])
    with pytest.raises(ValueError, match="guidance_interval"):
        make_denoiser(model, 2.0, guidance_interval=(0.7, 0.2), num_timesteps=1000)


def test_train_step_learns_a_flow():
    torch.manual_seed(0)
    options = DiTOptions(class_dropout_prob=0.0)
    model = tiny_dit("DiT-d1w48/2", options, input_size=4, in_channels=1, num_classes=2, learn_sigma=False)
    step = TrainStep(model, make_process(LOGIT_NORMAL), adamw(model, lr=3e-3))
    x0 = torch.full((64, 1, 4, 4), MU)
    losses = [step(x0 + S * torch.randn_like(x0), torch.zeros(64, dtype=torch.long))["loss"].item() for _ in range(150)]
    assert math.isfinite(losses[-1])
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(objective="flow"), "objective='flow' trains a velocity"),
        (dict(objective="flow", prediction="v", learn_sigma=False, loss="hybrid"), "learn_sigma=False, loss='mse'"),
        (dict(timestep_sampling="logit_normal"), "is for objective='flow'"),
        (dict(objective="edm"), "unknown objective 'edm'"),
        (dict(objective="flow", prediction="v", learn_sigma=False, loss="mse", timestep_sampling="beta"),
         "unknown timestep_sampling"),
    ],
)  # fmt: skip
def test_objective_combinations_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DiffusionConfig(**fields)


def test_ddpm_samplers_refuse_a_flow_model_and_flow_sampler_a_ddpm_one():
    with pytest.raises(ValueError, match="FlowSampler"):
        DDIMSampler(FLOW)
    with pytest.raises(ValueError, match="FlowSampler"):
        diffusers_scheduler("DDIMScheduler", FLOW)
    with pytest.raises(ValueError, match="objective='flow'"):
        FlowSampler(DiffusionConfig(), "euler")
    with pytest.raises(ValueError, match="unknown flow sampler 'rk4'"):
        FlowSampler(FLOW, "rk4")
