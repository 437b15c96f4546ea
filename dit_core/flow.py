"""Flow matching on the linear path (Lipman et al. 2023; Liu et al., rectified flow; SiT, Ma et al. 2024).

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]: t = 0 is data, t = 1 is noise
    u_t = d x_t / dt = eps - x_0            (the velocity the model learns, `objective="flow"`)
    L = E_t E_{x_0, eps} || v_theta(x_t, t) - (eps - x_0) ||^2

Timesteps t are drawn uniformly, or logit-normally, t = sigmoid(m + s n) with n ~ N(0, 1) (SD3, Esser et al. 2024,
section 3.1), which puts more training on the middle of the path. The model sees t scaled to the DDPM range,
`t * num_timesteps` (so its timestep embedding is the one a DDPM-trained DiT has).

`FlowMatching` offers the interface `GaussianDiffusion` offers for training (`sample_timesteps`, `q_sample`,
`loss_terms`, `training_losses`, `model_time`), so that `TrainStep` and the pipeline train either; `make_process`
picks one from a `DiffusionConfig`. The ODE and SDE samplers are in samplers.py.
"""

from __future__ import annotations

import torch

from dit_core.diffusion import DiffusionConfig, GaussianDiffusion, TrainingLosses


class FlowMatching(TrainingLosses):
    """The linear interpolant and its velocity loss, for `config.objective == "flow"`; `training_losses` (inherited)
    calls the model at t * num_timesteps. No respacing: a flow is trained and sampled in continuous time."""

    def __init__(self, config: DiffusionConfig):
        if config.objective != "flow":
            raise ValueError(f"FlowMatching needs objective='flow', got {config.objective!r}")
        self.config = config

    def to(self, device: torch.device | str) -> FlowMatching:
        return self  # no tables

    # --- time -----------------------------------------------------------------------------------------------------

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu", generator=None) -> torch.Tensor:
        """t (n,) float32 in (0, 1): uniform, or sigmoid(m + s * N(0, 1)) for logit_normal."""
        c = self.config
        if c.timestep_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        return torch.sigmoid(
            c.logit_normal_mean + c.logit_normal_std * torch.randn(n, device=device, generator=generator)
        )

    def spread_timesteps(self, n: int) -> torch.Tensor:
        """n timesteps evenly spread over (0, 1): the validation loss's fixed grid."""
        return (torch.arange(n, dtype=torch.float32) + 0.5) / n

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the DiT's timestep embedder sees: t * num_timesteps, in the DDPM range [0, 1000]."""
        return t * self.config.num_timesteps

    # --- path and loss --------------------------------------------------------------------------------------------

    @staticmethod
    def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.float().view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        t = self._expand(t, x_start)
        return (1 - t) * x_start + t * noise

    @staticmethod
    def velocity_target(x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """u = eps - x_0, the path's time derivative."""
        return noise - x_start

    def loss_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """{"loss": (N,), "mse": (N,)}: the mean squared velocity error of each sample."""
        velocity = model_output.float()
        if velocity.shape != x_start.shape:
            raise ValueError(
                f"flow matching expects the model to output {x_start.shape[1]} channels (a velocity), got "
                f"{velocity.shape[1]}: build the DiT with learn_sigma=False"
            )
        mse = (velocity - self.velocity_target(x_start, noise)).pow(2).flatten(1).mean(1)
        return {"loss": mse, "mse": mse}

    # --- what a velocity implies ------------------------------------------------------------------------------------

    def predict_x0_eps(self, velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(x_0, eps) implied by velocity v at x_t: x_0 = x_t - t v, eps = x_t + (1 - t) v."""
        t = self._expand(t, x_t)
        return x_t - t * velocity, x_t + (1 - t) * velocity


Process = GaussianDiffusion | FlowMatching


def make_process(config: DiffusionConfig = DiffusionConfig()) -> Process:
    """The training process `config.objective` names: GaussianDiffusion ("ddpm") or FlowMatching ("flow")."""
    return FlowMatching(config) if config.objective == "flow" else GaussianDiffusion(config)
