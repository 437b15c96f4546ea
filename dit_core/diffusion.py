"""Gaussian diffusion: noise schedules, q_sample, the reverse-process parameterisation and the training losses.
(`DiffusionConfig` also selects flow matching, `objective="flow"`, which lives in flow.py.)

Notation (Ho et al. 2020; Nichol & Dhariwal 2021, "improved DDPM"): beta_t the noise schedule, alpha_bar_t the
cumulative product of (1 - beta), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

The model predicts one of eps, x_0 or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (`prediction`), plus, with
`learn_sigma`, a per-pixel v_var in [-1, 1] that interpolates the reverse variance in log space between the posterior
variance beta_tilde_t and beta_t (improved DDPM eq. 15). The paper's recipe is eps + learned sigma trained with the
hybrid loss: MSE on eps plus the single-timestep variational bound term L_vlb computed with the predicted mean
detached, so L_vlb only trains the variance.

This module knows no sampler: samplers.py walks the reverse chain with `p_mean_variance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

PREDICTIONS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine")
LOSSES = ("hybrid", "mse")
OBJECTIVES = ("ddpm", "flow")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the training objective. Defaults are the paper's."""

    num_timesteps: int = 1000  # T: diffusion steps of training
    schedule: str = "linear"  # "linear" (beta_start..beta_end) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4  # first beta of the linear schedule (for T = 1000)
    beta_end: float = 0.02  # last beta of the linear schedule (for T = 1000)
    prediction: str = "eps"  # what the model's first C channels predict: "eps", "x0" or "v"
    learn_sigma: bool = True  # the model's last C channels interpolate the reverse variance
    loss: str = "hybrid"  # "hybrid" = MSE + L_vlb (needs learn_sigma), "mse" = MSE on the prediction alone
    objective: str = "ddpm"  # "ddpm": this discrete process; "flow": flow matching on the linear path (flow.py)
    timestep_sampling: str = "uniform"  # flow: "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(m + s n)
    logit_normal_mean: float = 0.0  # m of logit_normal (SD3: 0)
    logit_normal_std: float = 1.0  # s of logit_normal (SD3: 1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}; choose one of {TIMESTEP_SAMPLING}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be positive, got {self.logit_normal_std}")
        if self.objective == "flow" and (self.learn_sigma or self.loss != "mse" or self.prediction != "v"):
            raise ValueError(
                "objective='flow' trains a velocity with a plain MSE and no learned variance: set "
                "prediction='v', learn_sigma=False, loss='mse' "
                f"(got prediction={self.prediction!r}, learn_sigma={self.learn_sigma}, loss={self.loss!r})"
            )
        if self.objective == "ddpm" and self.timestep_sampling != "uniform":
            raise ValueError(
                f"timestep_sampling={self.timestep_sampling!r} is for objective='flow'; the DDPM objective draws its "
                f"timesteps uniformly"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {PREDICTIONS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise ValueError("loss='hybrid' trains the learned variance: set learn_sigma=True or use loss='mse'")
        if self.learn_sigma and self.loss != "hybrid":
            raise ValueError("learn_sigma=True needs loss='hybrid' (only L_vlb trains the variance channels)")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    """beta_1..beta_T as float64, (T,)."""
    T = config.num_timesteps
    if config.schedule == "linear":
        scale = 1000 / T  # keep the schedule's shape when T != 1000, as improved DDPM does
        return torch.linspace(scale * config.beta_start, scale * config.beta_end, T, dtype=torch.float64)
    # cosine: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped at 0.999
    s = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """Timesteps kept when sampling with fewer steps.

    "250": 250 steps spread evenly over [0, T) (several comma-separated counts split T into equal sections);
    "ddim50": the exact stride k with len(range(0, T, k)) == 50, as DDIM does.
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        want = int(spec[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {want} steps out of {num_timesteps}; use '{want}'")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"bad timestep respacing {spec!r}: use e.g. '250', '25,25' or 'ddim50'") from None
    section = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = section + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps (respacing {spec!r})")
        # The improved-DDPM rule: accumulate the fractional stride and round the running total. Rounding j * stride
        # instead differs for some counts (21, 23, 31, ... of 1000) by one timestep, through float rounding at .5.
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@dataclass
class PMeanVariance:
    """One reverse step's Gaussian p(x_{t-1} | x_t) and the model's implied x_0 and eps."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


class TrainingLosses:
    """`training_losses` written once for every process: noise x_0 to x_t, run the model at the process's time, score
    its output. A process (GaussianDiffusion below, FlowMatching in flow.py) supplies `q_sample(x_start, t, noise)`,
    `model_time(t)` and `loss_terms(model_output, x_start, x_t, t, noise)`; TrainStep runs this same method."""

    respacing: str | None = None  # None: the full process, which training needs (a respaced one is for sampling)

    def check_trainable(self) -> None:
        if self.respacing is not None:
            raise ValueError("train on the full process, not a respaced one (respacing is for sampling)")

    def training_losses(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses of `model(x_t, model_time(t), y)` at timesteps t (N,), x_t = q_sample(x_start, t, noise).

        Returns `loss_terms`: {"loss": (N,), "mse": (N,)} and, with GaussianDiffusion's hybrid loss, "vb": (N,). The
        noise defaults to a fresh draw from torch's global generator.
        """
        self.check_trainable()
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        return self.loss_terms(model(x_t, self.model_time(t), y), x_start, x_t, t, noise)


class GaussianDiffusion(TrainingLosses):
    """The forward process q and the model-parameterised reverse process p over (possibly respaced) timesteps.

    With respacing, index i in [0, S) of this process corresponds to original timestep `timestep_map[i]`; the model
    is always called with original timesteps (what it was trained on).
    """

    def __init__(self, config: DiffusionConfig = DiffusionConfig(), respacing: str | None = None):
        self.config = config
        base_betas = make_betas(config)
        if respacing is None:
            kept = list(range(config.num_timesteps))
            betas = base_betas
        else:
            kept = space_timesteps(config.num_timesteps, respacing)
            base_alpha_bar = torch.cumprod(1 - base_betas, dim=0)
            last, new = 1.0, []
            for i in kept:
                new.append(1 - base_alpha_bar[i].item() / last)
                last = base_alpha_bar[i].item()
            betas = torch.tensor(new, dtype=torch.float64)
        self.respacing = respacing
        self.timestep_map = torch.tensor(kept, dtype=torch.long)  # (S,) index -> original timestep
        self.num_steps = len(kept)

        # All coefficients in float64 on the CPU; `_at` gathers and casts per call.
        self.betas = betas
        alphas = 1 - betas
        self.alpha_bar = torch.cumprod(alphas, dim=0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t)   (DDPM eq. 6-7)
        self.posterior_variance = betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        # beta_tilde_0 = 0: clip the log at t = 0 to the t = 1 value, as improved DDPM does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.posterior_mean_coef2 = (1 - self.alpha_bar_prev) * alphas.sqrt() / (1 - self.alpha_bar)
        self.log_betas = torch.log(betas)

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Keep the coefficient tables (float64) on `device`, so that no step copies them from the host; returns self.

        On a GPU, `coef.to("cuda")` from host memory waits for the device: call this once (TrainStep and the samplers
        do) rather than once per gather.
        """
        device = torch.device(device)
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(self, name, value.to(device))
        return self

    # --- time (the interface FlowMatching shares) -----------------------------------------------------------------

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}, (n,) long."""
        return sample_timesteps(n, self.config.num_timesteps, device=device, generator=generator)

    def spread_timesteps(self, n: int) -> torch.Tensor:
        """n timesteps evenly spread over [0, T-1] (rounded): the validation loss's fixed grid."""
        return torch.linspace(0, self.config.num_timesteps - 1, n).round().long()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the DiT sees: the timestep itself."""
        return t

    @staticmethod
    def _at(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """coef[t] as float32 on t's device, shaped (N, 1, 1, 1) to broadcast over x (a copy if coef is elsewhere)."""
        values = (coef if coef.device == t.device else coef.to(t.device))[t].float()
        return values.view(-1, *([1] * (x.ndim - 1)))

    # --- forward process ------------------------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._at(self.sqrt_alpha_bar, t, x_start) * x_start
            + self._at(self.sqrt_one_minus_alpha_bar, t, x_start) * noise
        )

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def prediction_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model's first C channels are trained to output."""
        if self.config.prediction == "eps":
            return noise
        if self.config.prediction == "x0":
            return x_start
        return (
            self._at(self.sqrt_alpha_bar, t, x_start) * noise
            - self._at(self.sqrt_one_minus_alpha_bar, t, x_start) * x_start
        )

    # --- reverse process ------------------------------------------------------------------------------------------

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C or 2C, ...) -> (prediction (N, C, ...), variance values (N, C, ...) or None)."""
        if self.config.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learn_sigma=True expects {2 * channels} output channels, got {model_output.shape[1]}: "
                    f"build the DiT with learn_sigma matching the diffusion config"
                )
            return model_output[:, :channels], model_output[:, channels:]
        if model_output.shape[1] != channels:
            raise ValueError(f"expected {channels} output channels, got {model_output.shape[1]} (learn_sigma=False)")
        return model_output, None

    def predict_x0_eps(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the model's prediction (eps, x0 or v) into (x_0, eps) implied at x_t."""
        a, b = self._at(self.sqrt_alpha_bar, t, x_t), self._at(self.sqrt_one_minus_alpha_bar, t, x_t)
        if self.config.prediction == "eps":
            eps = prediction
            x0 = (x_t - b * eps) / a
        elif self.config.prediction == "x0":
            x0 = prediction
            eps = (x_t - a * x0) / b
        else:  # v = a eps - b x0  =>  x0 = a x_t - b v, eps = b x_t + a v
            x0 = a * x_t - b * prediction
            eps = b * x_t + a * prediction
        return x0, eps

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_x0: float | None = None,
    ) -> PMeanVariance:
        """p(x_{t-1} | x_t) from a model output at index t of this (possibly respaced) process.

        clip_x0 clamps the implied x_0 to [-clip_x0, clip_x0] (the paper does not clip latents: None).
        """
        prediction, var_values = self.split_output(model_output.float(), x_t.shape[1])
        if var_values is None:  # fixed variance: the posterior's beta_tilde ("fixed small")
            log_variance = self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        else:  # log variance interpolated between log beta_tilde and log beta (improved DDPM eq. 15)
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(self.log_betas, t, x_t)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        x0, eps = self.predict_x0_eps(prediction, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - self._at(self.sqrt_alpha_bar, t, x_t) * x0) / self._at(self.sqrt_one_minus_alpha_bar, t, x_t)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return PMeanVariance(mean, log_variance.exp(), log_variance, x0, eps)

    # --- training -------------------------------------------------------------------------------------------------

    # (training_losses, inherited from TrainingLosses, runs the model and calls loss_terms)

    def loss_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The per-sample losses from the model's output at x_t = q_sample(x_start, t, noise), t (N,) of the full
        process: {"loss": (N,), "mse": (N,)} and, with the hybrid loss, "vb": (N,). "mse" is the mean squared error of
        the prediction; "vb" is L_vlb in bits per dimension with the predicted mean detached (it trains only the
        variance)."""
        model_output = model_output.float()
        prediction, var_values = self.split_output(model_output, x_start.shape[1])
        target = self.prediction_target(x_start, noise, t)
        mse = (prediction - target).pow(2).flatten(1).mean(1)
        terms = {"mse": mse}
        if self.config.loss == "hybrid":
            frozen = torch.cat([prediction.detach(), var_values], dim=1)
            terms["vb"] = self.vb_term(frozen, x_start, x_t, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def vb_term(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_{t-1} in bits/dim, (N,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p.mean, p.log_variance).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p.mean, 0.5 * p.log_variance).flatten(1).mean(1)
        nll = nll / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """Elementwise log-probability of data x in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

    The two outermost bins extend to -inf and +inf. Uses the exact normal CDF.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + bin_width / 2))
    cdf_min = torch.special.ndtr(inv_std * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def sample_timesteps(batch_size: int, num_timesteps: int, device: torch.device | str = "cpu", generator=None):
    """t ~ Uniform{0, ..., T-1}, (N,) long."""
    return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)
