"""Exponential moving average of model weights (the paper samples from EMA weights, decay 0.9999 every step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode: the EMA starts equal to the model, as in the paper."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter, in one fused foreach kernel per dtype.

    `model` may be wrapped (DDP, torch.compile); parameters are matched by order, which the wrappers keep.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    ema_params = list(ema.parameters())
    model_params = list(unwrap_model(model).parameters())
    if len(ema_params) != len(model_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters but the model has {len(model_params)}")
    # lerp(ema, p, w) = ema + w * (p - ema) = (1 - w) ema + w p, with w = 1 - decay
    torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1.0 - decay)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
