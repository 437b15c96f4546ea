"""Gaussian diffusion: schedules, respacing, q_sample moments, loss terms against independent computations."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dit_core.diffusion import DiffusionConfig, GaussianDiffusion, make_betas, space_timesteps


def numpy_alpha_bar():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def test_linear_schedule_matches_paper():
    betas = make_betas(DiffusionConfig())
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    np.testing.assert_allclose(GaussianDiffusion().alpha_bar.numpy(), numpy_alpha_bar(), rtol=1e-12)


def test_cosine_schedule():
    betas = make_betas(DiffusionConfig(schedule="cosine"))
    s = np.arange(1001) / 1000
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(betas.numpy(), np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-10)
    assert betas.max().item() == pytest.approx(0.999)


def test_respacing_specs():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert len(space_timesteps(1000, "10,20")) == 30
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim300")


def improved_ddpm_rule(num_timesteps: int, count: int) -> list[int]:
    """The rule as improved DDPM states it: a running sum of the fractional stride, rounded at every step."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    total, kept = 0.0, []
    for _ in range(count):
        kept.append(round(total))
        total = total + stride
    return kept


def test_respacing_follows_the_official_rule_for_every_count():
    for count in range(1, 1001):
        assert space_timesteps(1000, str(count)) == improved_ddpm_rule(1000, count), count
    # the counts where rounding j * stride instead would keep another timestep
    naive = {c: [round(j * (999 / (c - 1))) for j in range(c)] for c in (21, 23, 31)}
    for count, steps in naive.items():
        assert space_timesteps(1000, str(count)) != steps
        assert sum(a != b for a, b in zip(space_timesteps(1000, str(count)), steps)) == 1


def test_respaced_process_keeps_alpha_bar_at_kept_steps():
    full, spaced = GaussianDiffusion(), GaussianDiffusion(respacing="250")
    torch.testing.assert_close(spaced.alpha_bar, full.alpha_bar[spaced.timestep_map], rtol=1e-10, atol=0)
    assert spaced.num_steps == 250


def test_q_sample_moments():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for step in (0, 300, 999):
        t = torch.full((x0.shape[0],), step)
        xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        ab = numpy_alpha_bar()[step]
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-5)


def test_hybrid_loss_equals_hand_computation():
    """Tiny case: fixed model output, two timesteps (t = 0 decoder NLL, t = 5 KL), numpy/scipy reference."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 1, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(2, 1, 2, 2, generator=g)
    out = torch.randn(2, 2, 2, 2, generator=g) * 0.5  # eps prediction (1 channel) + v (1 channel)
    t = torch.tensor([0, 5])
    terms = d.training_losses(lambda x, tt, y: out, x0, t, torch.zeros(2, dtype=torch.long), noise)

    betas = np.linspace(1e-4, 0.02, 1000)
    ab = numpy_alpha_bar()
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    log_post_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    X0, N, O = x0.double().numpy(), noise.double().numpy(), out.double().numpy()
    for i, step in enumerate(t.tolist()):
        xt = math.sqrt(ab[step]) * X0[i] + math.sqrt(1 - ab[step]) * N[i]
        eps, v = O[i, :1], O[i, 1:]
        mse = np.mean((eps - N[i]) ** 2)
        x0_hat = (xt - math.sqrt(1 - ab[step]) * eps) / math.sqrt(ab[step])
        c1 = betas[step] * math.sqrt(ab_prev[step]) / (1 - ab[step])
        c2 = (1 - ab_prev[step]) * math.sqrt(1 - betas[step]) / (1 - ab[step])
        mean = c1 * x0_hat + c2 * xt
        frac = (v + 1) / 2
        logvar = frac * np.log(betas[step]) + (1 - frac) * log_post_clipped[step]
        if step == 0:
            std = np.exp(0.5 * logvar)
            hi, lo = (X0[i] - mean + 1 / 255) / std, (X0[i] - mean - 1 / 255) / std
            ll = np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo))
            vb = -np.mean(ll) / math.log(2)
        else:
            true_mean = c1 * X0[i] + c2 * xt
            true_logvar = log_post_clipped[step]
            kl = 0.5 * (
                logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 / np.exp(logvar) - 1
            )
            vb = np.mean(kl) / math.log(2)
        assert terms["mse"][i].item() == pytest.approx(mse, rel=1e-5)
        assert terms["vb"][i].item() == pytest.approx(vb, rel=1e-4)
        assert terms["loss"][i].item() == pytest.approx(mse + vb, rel=1e-4)


def test_vb_term_matches_torch_distributions_kl():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    out = torch.randn(4, 6, 4, 4, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    true_mean, _, true_logvar = d.q_posterior(x0, xt, t)
    p = d.p_mean_variance(out, xt, t)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(true_mean.double(), (0.5 * true_logvar.double()).exp()),
        torch.distributions.Normal(p.mean.double(), (0.5 * p.log_variance.double()).exp()),
    )
    expected = kl.flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(d.vb_term(out, x0, xt, t).double(), expected, rtol=1e-4, atol=1e-6)


def test_vb_only_trains_the_variance():
    d = GaussianDiffusion()
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t, y: out, torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.zeros(2))
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :4].abs().max() == 0 and grad[:, 4:].abs().max() > 0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_parameterisations_round_trip(prediction):
    """Feeding the exact target recovers x0 and eps exactly, for every parameterisation."""
    cfg = DiffusionConfig(prediction=prediction, learn_sigma=False, loss="mse")
    d = GaussianDiffusion(cfg)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 250, 999])
    xt = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.predict_x0_eps(d.prediction_target(x0, noise, t), xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, noise, atol=2e-3, rtol=1e-3)
    loss = d.training_losses(lambda x, tt, y: d.prediction_target(x0, noise, t), x0, t, None, noise)
    assert loss["loss"].abs().max() < 1e-10


def test_bad_diffusion_configs():
    with pytest.raises(ValueError, match="learn_sigma=True"):
        GaussianDiffusion(DiffusionConfig(learn_sigma=False))
    with pytest.raises(ValueError, match="unknown prediction"):
        GaussianDiffusion(DiffusionConfig(prediction="score"))
    with pytest.raises(ValueError, match="expects 8 output channels"):
        GaussianDiffusion().training_losses(lambda x, t, y: x, torch.randn(1, 4, 2, 2), torch.tensor([1]), None)
    with pytest.raises(ValueError, match="respaced"):
        GaussianDiffusion(respacing="250").training_losses(lambda x, t, y: x, torch.randn(1, 4, 2, 2), None, None)


def test_coefficient_tables_live_on_the_device_and_are_not_copied_per_step(monkeypatch):
    """On a GPU a copy of a host table waits for the device; after .to(device) no gather copies anything."""
    diffusion = GaussianDiffusion(DiffusionConfig(loss="hybrid")).to("meta")
    tables = [v for v in vars(diffusion).values() if isinstance(v, torch.Tensor)]
    assert len(tables) > 10 and all(v.device.type == "meta" for v in tables)
    moves = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.device != self.device:
            moves.append((self.device, out.device))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    x0 = torch.empty(4, 4, 8, 8, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    noise = torch.empty_like(x0)
    x_t = diffusion.q_sample(x0, t, noise)
    terms = diffusion.loss_terms(torch.empty(4, 8, 8, 8, device="meta"), x0, x_t, t, noise)
    diffusion.p_mean_variance(torch.empty(4, 8, 8, 8, device="meta"), x_t, t)
    assert terms["loss"].shape == (4,) and moves == []
    # a table left on the host is still gathered correctly (copied)
    host = GaussianDiffusion(DiffusionConfig())
    assert host._at(host.alpha_bar, t, x0).device.type == "meta" and moves
