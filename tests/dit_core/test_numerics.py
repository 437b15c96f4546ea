"""The fast paths a GPU run takes keep the numerics: bf16 autocast against fp32, and torch.compile (inductor)
against eager, for the outputs, the hybrid loss and every gradient of a training step; bf16 autocast against fp32 for
whole sampling chains."""

import pytest
import torch
import torch._inductor.config

from dit_core import DiffusionConfig, GaussianDiffusion
from dit_core.samplers import DDPMSampler, FlowSampler, make_denoiser
from tests.dit_core.builders import draw_zero_init, tiny_dit


def step_terms(model, x0, t, y, autocast: bool = False):
    """(model output, loss, {name: grad}) of one hybrid-loss step."""
    diffusion = GaussianDiffusion(DiffusionConfig())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same label dropout and the same noise for every variant
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x0, t, y)
        loss = diffusion.training_losses(model, x0, t, y)["loss"].mean()
    loss.backward()
    return out.float(), loss.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def inputs(batch: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.randint(0, 1000, (batch,), generator=g),
        torch.randint(0, 10, (batch,), generator=g),
    )


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    model = draw_zero_init(tiny_dit(seed=0))
    x0, t, y = inputs()
    out32, loss32, grads32 = step_terms(model, x0, t, y)
    out16, loss16, grads16 = step_terms(model, x0, t, y, autocast=True)
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%); measured here: output 0.4%, loss 0.01%, gradients
    # 0.3% in all and 0.7% for the worst tensor. The bounds leave about 5x room.
    assert relative_error(out16, out32) < 0.02
    assert abs(float(loss16) - float(loss32)) / float(loss32) < 0.005
    assert grads16.keys() == grads32.keys()
    worst = max(relative_error(grads16[n], grads32[n]) for n in grads32 if grads32[n].norm() > 0)
    assert worst < 0.05, worst  # every tensor's gradient, the smallest included
    total = relative_error(
        torch.cat([g.flatten() for g in grads16.values()]), torch.cat([g.flatten() for g in grads32.values()])
    )
    assert total < 0.015


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inductor_compiled_step_matches_eager():
    """The fused kernels torch.compile generates (what `train.compile=true` runs) give the eager step's numbers."""
    model = draw_zero_init(tiny_dit(seed=0))
    x0, t, y = inputs()
    out_e, loss_e, grads_e = step_terms(model, x0, t, y)
    compiled = torch.compile(model)
    # inductor draws random numbers (label dropout) with its own generator unless told to use eager's
    with torch._inductor.config.patch(fallback_random=True):
        out_c, loss_c, grads_c = step_terms(compiled, x0, t, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    names = {n.removeprefix("_orig_mod.") for n in grads_c}
    assert names == set(grads_e)
    for name, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[name.removeprefix("_orig_mod.")], rtol=1e-3, atol=1e-5)


FLOW = DiffusionConfig(objective="flow", prediction="v", learn_sigma=False, loss="mse")
SAMPLING = {
    "ddpm-learned-variance": (DiffusionConfig(), lambda config: DDPMSampler(config, respacing="50")),
    "flow-heun": (FLOW, lambda config: FlowSampler(config, "heun", num_steps=10)),
}


@pytest.mark.parametrize("positions", ["sincos", "rope"])
@pytest.mark.parametrize("name", SAMPLING)
def test_sampling_under_bf16_autocast_matches_fp32(name, positions):
    """A guided sampling chain with the DiT under bf16 autocast (what the FID stage runs on a GPU) from the same noise
    and generator as in fp32 stays finite, in fp32 (the samplers read the model's output with .float()) and close.
    Measured worst relative difference (L2 over the batch), over model seeds 0-2 and both position kinds: DDPM-50
    with learned variance 0.081%, flow Heun-10 0.074%. The bound is bf16's unit roundoff, 2^-8 = 0.39%: about 5x."""
    config, make_sampler = SAMPLING[name]
    model = draw_zero_init(tiny_dit(seed=0, learn_sigma=config.learn_sigma, positions=positions)).eval()
    denoise = make_denoiser(model, cfg_scale=1.5, num_timesteps=config.num_timesteps)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10

    def sample(autocast: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return make_sampler(config).sample(denoise, noise, y, generator=torch.Generator().manual_seed(2))

    x32, x16 = sample(autocast=False), sample(autocast=True)
    assert x16.dtype == torch.float32 and torch.isfinite(x16).all()
    assert relative_error(x16, x32) < 2**-8
