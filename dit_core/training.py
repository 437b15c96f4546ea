"""One DiT training step: forward, diffusion loss, backward, gradient clipping, AdamW and the EMA update.

The pipeline's training loop and benchmarks/train_step.py both run `TrainStep`, so the benchmark times exactly what a
sweep runs. Nothing in a step reads a value back to the host: the losses and the gradient norm come back as device
tensors, for the caller to average and log once per logging window (one synchronisation per window, not per step).

    step = TrainStep(model, GaussianDiffusion(), adamw(model), ema=create_ema(model), autocast_dtype=torch.bfloat16)
    out = step(x0, y)  # {"loss", "mse", "vb"} (+ "grad_norm"), detached 0-d device tensors
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn

from dit_core.ema import update_ema
from dit_core.flow import Process

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def adamw(
    model: nn.Module,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (the paper: lr 1e-4, no weight decay); one fused kernel on CUDA.

    Every parameter is registered, the frozen position embedding too (it never has a gradient, so it never moves):
    the optimizer state then indexes parameters as `model.parameters()` does, which checkpoints rely on.
    """
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


class TrainStep:
    """forward -> loss -> backward -> clip -> AdamW -> EMA, with no host synchronisation.

    Args:
        model: the DiT whose parameters the optimizer holds (unwrapped).
        diffusion: the process that defines the loss: GaussianDiffusion or FlowMatching (`make_process`).
        optimizer: built over `model`'s parameters, e.g. by `adamw`.
        ema: EMA copy of `model` updated after every step, or None.
        ema_decay: EMA decay per step (the paper: 0.9999).
        more_emas: further EMA copies kept at once, {decay: copy of `model`} (the best EMA length depends on the
            model's size and training length, EDM2); each updated after every step with its own decay.
        grad_clip: clip the global gradient L2 norm to this value; 0 = no clipping.
        autocast_dtype: torch.bfloat16 for mixed precision; None = the parameters' dtype (fp32).
        forward: the callable that runs the model (a DistributedDataParallel wrapper of it); default `model`.
        compile: torch.compile the forward (inductor fuses the LayerNorm, modulation, GELU and residual kernels) and,
            apart from it (so that a DDP wrapper stays outside), the noising and the loss.
        compile_mode: torch.compile mode, one of COMPILE_MODES ("reduce-overhead" adds CUDA graphs).
        compile_loss: with compile, compile the noising and the loss too (False: the model alone, for comparison).
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: Process,
        optimizer: torch.optim.Optimizer,
        ema: nn.Module | None = None,
        *,
        ema_decay: float = 0.9999,
        more_emas: dict[float, nn.Module] | None = None,
        grad_clip: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        forward: nn.Module | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        compile_loss: bool = True,
    ):
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 = no clipping), got {grad_clip}")
        diffusion.check_trainable()
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.ema_decay, self.grad_clip = ema_decay, grad_clip
        self.more_emas = dict(more_emas or {})
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.diffusion = diffusion.to(self.device)  # coefficient tables on the device: no copy per step
        forward = forward if forward is not None else model
        self.losses = self.diffusion  # whose training_losses a step runs
        if compile:
            forward = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode)
            if compile_loss:  # the loss's elementwise math (dozens of small kernels, both ways) fuses into a few
                # the same process with its noising and loss compiled, apart from the model (a DDP wrapper stays
                # outside a compiled graph); training_losses finds them as attributes of this copy
                self.losses = copy.copy(self.diffusion)
                self.losses.q_sample = torch.compile(self.diffusion.q_sample)
                self.losses.loss_terms = torch.compile(self.diffusion.loss_terms)
        self.forward = forward
        self.autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        )

    def __call__(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        measure_grad_norm: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One step on clean latents x0 (N, C, H, W) with labels y (N,).

        t (N,) and noise default to fresh draws from torch's global generator (t first, then the noise, then label
        dropout inside the model). Returns detached 0-d tensors on the device: "loss", "mse", "vb" (zero without the
        hybrid loss) and "grad_norm" (the norm before clipping) when clipping or `measure_grad_norm`.
        """
        if t is None:
            t = self.diffusion.sample_timesteps(x0.shape[0], device=x0.device)
        with self.autocast:
            terms = self.losses.training_losses(self.forward, x0, t, y, noise)
        loss = terms["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        out = {"loss": loss.detach(), "mse": terms["mse"].detach().mean()}
        out["vb"] = terms["vb"].detach().mean() if "vb" in terms else torch.zeros((), device=x0.device)
        if self.grad_clip > 0:
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip).detach()
        elif measure_grad_norm:
            grads = [p.grad for p in self.params if p.grad is not None]
            out["grad_norm"] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.optimizer.step()
        if self.ema is not None:
            update_ema(self.ema, self.model, self.ema_decay)
        for decay, ema in self.more_emas.items():
            update_ema(ema, self.model, decay)
        return out


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions on CUDA (the official DiT recipe: 'TF32 on').

    Sets torch's per-backend precision (`torch.backends.cuda.matmul.fp32_precision`, `cudnn.conv.fp32_precision`).
    `torch.set_float32_matmul_precision("high")` comes first, and means the same: without it, once the per-backend
    setting is used, `torch.get_float32_matmul_precision()` raises ("mix of the legacy and new APIs"), and inductor's
    autotuning still reads it (torch 2.14: its autotune cache and precompile keys; pytorch/pytorch#196728), so a
    max-autotune compile would fail. It also sets oneDNN's CPU matmuls to TF32 where the CPU has it.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
