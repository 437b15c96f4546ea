"""Samplers: walk the reverse process from noise to data, given a denoiser callable.

A sampler never sees the model. It calls `denoise(x_t, t, y) -> model output`, where t holds original training
timesteps (0..T-1) and the output is what the DiT returns (prediction, plus variance channels with learn_sigma).
`make_denoiser` builds that callable from a DiT, with classifier-free guidance when cfg_scale != 1.

- DDPMSampler: ancestral sampling with the learned (or fixed) variance over respaced steps: the paper's 250 steps.
- DDIMSampler: DDIM (Song et al. 2021), deterministic at eta = 0.
- FlowSampler: the probability-flow ODE (Euler or Heun) or SiT's Euler-Maruyama SDE of a velocity model
  (`objective="flow"`, dit_core/flow.py).
- DiffusersSampler: any diffusers scheduler (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, ...) driving
  the same denoiser, with betas and prediction type taken from our DiffusionConfig.

Every sampler is deterministic given a torch.Generator on the sample's device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dit_core.diffusion import DiffusionConfig, GaussianDiffusion, make_betas
from dit_core.flow import FlowMatching

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_denoiser(
    model: torch.nn.Module,
    cfg_scale: float = 1.0,
    guidance_channels: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    *,
    num_timesteps: int,
) -> Denoiser:
    """denoise(x_t, t, y) for a DiT; with cfg_scale != 1 the conditional and unconditional passes run batched.

    Args:
        model: the DiT (its `forward_with_cfg` runs the guided pass).
        cfg_scale: classifier-free guidance scale s, out = uncond + s (cond - uncond); 1 = no guidance.
        guidance_channels: guide only the first this many output channels (None: all C; 3: the official sampler).
        guidance_interval: (lo, hi) guides only the steps whose noise level lies in [lo, hi], ends included; the
            others take one conditional pass (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval").
            The noise level is the model time over num_timesteps: t / T for DDPM (t the original training timestep
            0..T-1, which every sampler passes, respaced or not), the path time s in [0, 1] for a flow (its model time
            is s * T, flow.py). 0 is data, 1 is pure noise. None guides every step.
        num_timesteps: T, the diffusion config's `num_timesteps` (the model time's scale).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be the diffusion config's T >= 1, got {num_timesteps}")
    if cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    guided = lambda x, t, y: model.forward_with_cfg(x, t, y, cfg_scale, guidance_channels)  # noqa: E731
    if guidance_interval is None:
        return guided
    lo, hi = guidance_interval
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {guidance_interval}")

    def denoise(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        level = t.float() / num_timesteps  # (N,) noise level: t / T (DDPM) or the path time s (flow)
        inside = (level >= lo) & (level <= hi)
        if t.device.type != "meta":  # one pass where the batch agrees (a meta tensor has no values to decide on)
            if bool(inside.all()):
                return guided(x, t, y)
            if not bool(inside.any()):
                return model(x, t, y)
        return torch.where(inside.view(-1, 1, 1, 1), guided(x, t, y), model(x, t, y))

    return denoise


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class _ReverseChain:
    """Walks a respaced reverse chain from x_T to x_0: at every step the denoiser's output gives p(x_{t-1} | x_t)
    (`GaussianDiffusion.p_mean_variance`), and the subclass's `step` says how x moves."""

    name = "reverse"

    def __init__(self, diffusion_config: DiffusionConfig, respacing: str, clip_x0: float | None):
        if diffusion_config.objective != "ddpm":
            raise ValueError(
                f"{self.name} samples the DDPM objective; a flow model takes FlowSampler (euler, heun, sde)"
            )
        self.diffusion = GaussianDiffusion(diffusion_config, respacing)
        self.clip_x0 = clip_x0

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_steps

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        noise: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """noise x_T (N, C, H, W), labels y (N,) -> x_0 (N, C, H, W)."""
        d = self.diffusion.to(noise.device)
        x = noise
        n = x.shape[0]
        for i in tqdm(reversed(range(self.num_steps)), total=self.num_steps, disable=not progress, desc=self.name):
            index = torch.full((n,), i, device=x.device, dtype=torch.long)
            out = denoise(x, d.timestep_map[index], y)
            p = d.p_mean_variance(out, x, index, clip_x0=self.clip_x0)
            x = self.step(d, p, x, index, last=i == 0, generator=generator)
        return x

    def step(self, d: GaussianDiffusion, p, x, index, last: bool, generator) -> torch.Tensor:
        raise NotImplementedError


class DDPMSampler(_ReverseChain):
    """Ancestral sampling x_{t-1} ~ N(mu_theta(x_t), Sigma_theta(x_t)) over `respacing` steps ("250" = the paper)."""

    name = "DDPM"

    def __init__(
        self,
        diffusion_config: DiffusionConfig = DiffusionConfig(),
        respacing: str = "250",
        clip_x0: float | None = None,
    ):
        super().__init__(diffusion_config, respacing, clip_x0)

    def step(self, d, p, x, index, last, generator):
        if last:
            return p.mean
        return p.mean + torch.exp(0.5 * p.log_variance) * _randn_like(p.mean, generator)


class DDIMSampler(_ReverseChain):
    """DDIM: x_{t-1} = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, sigma = eta * DDPM's; eta = 0 is an ODE."""

    name = "DDIM"

    def __init__(
        self,
        diffusion_config: DiffusionConfig = DiffusionConfig(),
        respacing: str = "ddim50",
        eta: float = 0.0,
        clip_x0: float | None = None,
    ):
        super().__init__(diffusion_config, respacing, clip_x0)
        self.eta = eta

    def step(self, d, p, x, index, last, generator):
        alpha_bar = d._at(d.alpha_bar, index, x)
        alpha_bar_prev = d._at(d.alpha_bar_prev, index, x)
        sigma = self.eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x = alpha_bar_prev.sqrt() * p.pred_x0 + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0)) * p.pred_eps
        if not last and self.eta > 0:
            x = x + sigma * _randn_like(x, generator)
        return x


class FlowSampler:
    """Integrate a velocity model from noise (t = 1) to data (t = 0) over `num_steps` uniform steps of h = 1/N.

    - "euler": x_{t-h} = x_t - h v(x_t, t)                                            (N evaluations)
    - "heun": Euler, then the trapezoid with v at the Euler point (Heun's 2nd order)   (2N evaluations)
    - "sde": Euler-Maruyama of the reverse SDE with the ODE's marginals (SiT),
          dx = [v - 1/2 w(t) s(x, t)] dt + sqrt(w(t)) dW,  score s = -eps_hat / t,  w(t) = 2 diffusion_norm t
      so x_{t-h} = x_t - h (v + diffusion_norm eps_hat) + sqrt(2 diffusion_norm t h) z; the last step takes the
      drift alone (no noise), as SiT's "Mean" last step does. w(t) is SiT's default diffusion form "sigma": its
      sampler adds sqrt(2 D) dW with D = diffusion_norm sigma_t, and sigma_t = t here, so the same diffusion_norm
      (SiT's --diffusion-norm, default 1) gives the same SDE.
    The model is called at model time t * T (flow.py); only its first C output channels are read.
    """

    METHODS = ("euler", "heun", "sde")

    def __init__(
        self,
        diffusion_config: DiffusionConfig,
        method: str = "heun",
        num_steps: int = 50,
        diffusion_norm: float = 1.0,
    ):
        if method not in self.METHODS:
            raise ValueError(f"unknown flow sampler {method!r}; choose one of {', '.join(self.METHODS)}")
        if num_steps < 1 or diffusion_norm < 0:
            raise ValueError(f"need num_steps >= 1 and diffusion_norm >= 0, got {num_steps}, {diffusion_norm}")
        self.flow = FlowMatching(diffusion_config)
        self.method, self.num_steps, self.diffusion_norm = method, num_steps, diffusion_norm
        self.name = f"flow-{method}"

    def velocity(self, denoise: Denoiser, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        time = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return denoise(x, self.flow.model_time(time), y)[:, : x.shape[1]].float()

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        noise: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """noise x_1 (N, C, H, W), labels y (N,) -> x_0 (N, C, H, W)."""
        x, h = noise.float(), 1.0 / self.num_steps
        for i in tqdm(range(self.num_steps), disable=not progress, desc=self.name):
            t = 1.0 - i * h
            v = self.velocity(denoise, x, t, y)
            if self.method == "euler":
                x = x - h * v
            elif self.method == "heun":
                x_euler = x - h * v
                x = x - h * 0.5 * (v + self.velocity(denoise, x_euler, t - h, y))
            else:
                eps_hat = x + (1 - t) * v  # flow.predict_x0_eps: eps implied by v at x_t
                x = x - h * (v + self.diffusion_norm * eps_hat)  # -h (v - 1/2 w(t) s), w(t) s = -2 norm eps_hat
                if i < self.num_steps - 1:
                    x = x + (2 * self.diffusion_norm * t * h) ** 0.5 * _randn_like(x, generator)
        return x


_DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_scheduler(name: str, diffusion_config: DiffusionConfig = DiffusionConfig(), **kwargs):
    """A diffusers scheduler (class name, e.g. "DPMSolverMultistepScheduler") set up for our forward process.

    Betas are passed exactly (`trained_betas`), the prediction type is mapped, x0 is not clipped, and DDPMScheduler
    gets variance_type="learned_range" when the model learns sigma.
    """
    import diffusers

    if diffusion_config.objective != "ddpm":
        raise ValueError(f"the diffusers schedulers here drive DDPM models; a flow model takes FlowSampler, not {name}")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ValueError(
            f"{name!r} is not a diffusers scheduler class (e.g. DDIMScheduler, DPMSolverMultistepScheduler)"
        )
    options = dict(
        num_train_timesteps=diffusion_config.num_timesteps,
        trained_betas=make_betas(diffusion_config).float().numpy(),
        prediction_type=_DIFFUSERS_PREDICTION[diffusion_config.prediction],
    )
    accepted = set(inspect.signature(cls.__init__).parameters)  # follows diffusers' config-registering wrapper
    if "clip_sample" in accepted:
        options["clip_sample"] = False
    if "variance_type" in accepted and name == "DDPMScheduler":
        options["variance_type"] = "learned_range" if diffusion_config.learn_sigma else "fixed_small"
    unknown = set(kwargs) - accepted
    if unknown:
        raise ValueError(f"{name} takes no options {sorted(unknown)}")
    options.update(kwargs)
    return cls(**{k: v for k, v in options.items() if k in accepted})


class DiffusersSampler:
    """Drive a dit_core denoiser with a diffusers scheduler for `num_steps` steps."""

    def __init__(self, scheduler, num_steps: int):
        self.scheduler = scheduler
        self.num_steps = num_steps
        variance_type = getattr(scheduler.config, "variance_type", None)
        self.passes_variance = variance_type in ("learned", "learned_range")
        self.step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        noise: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """noise (N, C, H, W), labels y (N,) -> x_0 (N, C, H, W)."""
        scheduler = self.scheduler
        scheduler.set_timesteps(self.num_steps, device=noise.device)
        channels = noise.shape[1]
        x = noise * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, disable=not progress, desc=type(scheduler).__name__):
            t_batch = t.to(noise.device).expand(x.shape[0])  # float for Euler-style schedulers
            out = denoise(scheduler.scale_model_input(x, t), t_batch, y).float()
            if not self.passes_variance:
                out = out[:, :channels]
            step_kwargs = {"generator": generator} if self.step_takes_generator else {}
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        return x
