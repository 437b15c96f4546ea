"""Builders the tests share: a tiny AutoencoderKL (random weights) made and saved locally, never downloaded."""

from pathlib import Path

import torch


def tiny_vae():
    """A 2-level AutoencoderKL: 4 latent channels, /2 downsampling, 16 px samples."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )


def save_tiny_vae(path: Path) -> Path:
    """The tiny VAE written with save_pretrained, to exercise AutoencoderKL.from_pretrained on a local folder."""
    tiny_vae().save_pretrained(path)
    return path
