"""Small builders the pipeline tests share: toy image folders, a tiny AutoencoderKL saved locally."""

from pathlib import Path

import torch


def save_tiny_vae(path: Path) -> Path:
    """A randomly initialised 2-level AutoencoderKL (4 latent channels, /2 downsampling) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
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
    vae.save_pretrained(path)
    return path
