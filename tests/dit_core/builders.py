"""The DiTs the dit_core tests build: tiny presets on 8 x 8 latents (milliseconds on a CPU), fresh or with weights
that carry signal, and the official DiT-XL/2 checkpoint's layout. Every test builds its DiT here."""

import torch

from dit_core.config import DiTConfig, DiTOptions, dit_config
from dit_core.model import DiT

TINY = "DiT-d2w64/2"  # 2 blocks of width 64, patch 2: 16 tokens on 8 x 8 latents


def tiny_config(preset: str = TINY, options: DiTOptions | None = None, **fields) -> DiTConfig:
    """`preset` with `options` on 8 x 8 latents of 4 channels and 10 classes; `fields` replace any DiTConfig field."""
    return dit_config(preset, options, **{"input_size": 8, "in_channels": 4, "num_classes": 10, **fields})


def tiny_dit(preset: str = TINY, options: DiTOptions | None = None, seed: int | None = None, **fields) -> DiT:
    """A freshly initialised DiT of `tiny_config` (adaLN-Zero: it outputs zeros); with `seed`, torch's global
    generator is seeded first."""
    if seed is not None:
        torch.manual_seed(seed)
    return DiT(tiny_config(preset, options, **fields))


def randomize(model: DiT, std: float = 0.05, seed: int = 0) -> DiT:
    """Give every trainable weight a random value (at init most outputs are zero by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def perturb(model: DiT, std: float = 0.02) -> DiT:
    """Add std * N(0, 1) (torch's global generator) to every trainable weight: the init's structure stays, and every
    parameter, the zero-initialised ones too, gets a gradient."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))
    return model


def draw_zero_init(model: DiT, std: float = 0.02) -> DiT:
    """Draw the zero-initialised weights (adaLN-Zero, final layer) from N(0, std^2) (torch's global generator), so
    that every path carries signal, as after some training."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, std)
    return model


def official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """The 292 keys of the official DiT-XL/2 state dict with their shapes (the released DiT-XL-2-256x256.pt)."""
    D = 1152
    shapes = {
        "pos_embed": (1, 256, D),
        "x_embedder.proj.weight": (D, 4, 2, 2),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "final_layer.linear.weight": (32, D),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(28):
        b = f"blocks.{i}"
        shapes.update(
            {
                f"{b}.attn.qkv.weight": (3 * D, D),
                f"{b}.attn.qkv.bias": (3 * D,),
                f"{b}.attn.proj.weight": (D, D),
                f"{b}.attn.proj.bias": (D,),
                f"{b}.mlp.fc1.weight": (4 * D, D),
                f"{b}.mlp.fc1.bias": (4 * D,),
                f"{b}.mlp.fc2.weight": (D, 4 * D),
                f"{b}.mlp.fc2.bias": (D,),
                f"{b}.adaLN_modulation.1.weight": (6 * D, D),
                f"{b}.adaLN_modulation.1.bias": (6 * D,),
            }
        )
    return shapes
