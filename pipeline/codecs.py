"""Image <-> latent codecs: the diffusers AutoencoderKL (hub id or local folder) and a weight-free pixel codec.

Images enter as float tensors (N, 3, H, W) in [-1, 1]; the DiT sees latents z (N, C, h, w) already multiplied by the
codec's scale factor. What a shard stores per image is `encode(images)`:

- vae: the posterior moments [mean, logvar] (2C, h, w) of diffusers' AutoencoderKL, so that training draws fresh
  posterior noise every step: z = (mean + exp(logvar / 2) * eps) * scale_factor (0.18215 for the SD VAEs).
- pixel: the image itself (C = 3 f^2 channels after an optional f x f space-to-depth), scale factor 1. No weights,
  no download: the pipeline and FID stay meaningful offline.

`describe()` gives the `CodecInfo` the manifest records; `codec_from_info` rebuilds the codec from it (the FID stage
decodes with the codec that made the shards).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    array = np.ascontiguousarray(images)
    if not array.flags.writeable:  # e.g. np.asarray of a PIL image; torch wants writable memory
        array = array.copy()
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounding as the paper: clamp(127.5 x + 128, 0, 255)."""
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True)
class CodecInfo:
    """What a shard folder's codec is, as its manifest records it (fields that do not apply to the kind are None)."""

    kind: str  # "vae" or "pixel"
    latent_channels: int  # C of the latent the DiT sees
    scale_factor: float  # z = stored latent (or posterior sample) x scale_factor
    stores_moments: bool  # shards hold [mean, logvar] (2C channels) rather than the latent itself
    space_to_depth: int | None = None  # pixel: f x f pixel blocks folded into channels
    vae: str | None = None  # vae: hub id or local folder
    revision: str | None = None  # vae: hub revision
    subfolder: str | None = None  # vae: subfolder inside a pipeline folder
    downsample: int | None = None  # vae: image side / latent side

    def to_dict(self) -> dict[str, Any]:
        kept = ("revision", "subfolder") if self.kind == "vae" else ()  # None there means the hub's default
        return {k: v for k, v in asdict(self).items() if v is not None or k in kept}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class PixelCodec:
    """The image is the latent (optionally space-to-depth by `space_to_depth`): no weights, scale factor 1."""

    kind = "pixel"
    stores_moments = False

    def __init__(self, space_to_depth: int = 1):
        if space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {space_to_depth}")
        self.space_to_depth = space_to_depth
        self.latent_channels = 3 * space_to_depth**2
        self.scale_factor = 1.0

    def latent_size(self, resolution: int) -> int:
        if resolution % self.space_to_depth:
            raise ValueError(f"resolution {resolution} is not divisible by space_to_depth {self.space_to_depth}")
        return resolution // self.space_to_depth

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> stored latent (N, C, h, w)."""
        return F.pixel_unshuffle(images, self.space_to_depth) if self.space_to_depth > 1 else images

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent z (N, C, h, w) -> images (N, 3, H, W), nominally in [-1, 1]."""
        return F.pixel_shuffle(z, self.space_to_depth) if self.space_to_depth > 1 else z

    def describe(self) -> CodecInfo:
        return CodecInfo(
            self.kind, self.latent_channels, self.scale_factor, self.stores_moments, space_to_depth=self.space_to_depth
        )


class VaeCodec:
    """diffusers AutoencoderKL loaded with from_pretrained(hub id or local folder), in batches on GPU or CPU."""

    kind = "vae"
    stores_moments = True

    def __init__(
        self,
        vae: str = DEFAULT_VAE,
        revision: str | None = None,
        subfolder: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        from diffusers import AutoencoderKL

        self.vae_id, self.revision, self.subfolder = vae, revision, subfolder
        self.device = torch.device(device)
        # bf16 on GPU (the encoder is fine in bf16; moments are stored as float16 anyway), fp32 on CPU.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        try:
            model = AutoencoderKL.from_pretrained(vae, revision=revision, subfolder=subfolder, torch_dtype=self.dtype)
        except OSError as exc:
            raise ValueError(
                f"cannot load the VAE {vae!r}: {exc}\n"
                f"give a local folder made by AutoencoderKL.save_pretrained (for air-gapped clusters), "
                f"or a hub id reachable from every node (e.g. {DEFAULT_VAE})"
            ) from exc
        self.vae = model.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.scale_factor = float(cfg.scaling_factor)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def latent_size(self, resolution: int) -> int:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling {self.downsample}")
        return resolution // self.downsample

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> posterior moments [mean, logvar] (N, 2C, h, w), float32 on the CPU."""
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent z (N, C, h, w) -> images (N, 3, H, W), nominally in [-1, 1]."""
        return self.vae.decode(z.to(self.device, self.dtype) / self.scale_factor).sample.float()

    def describe(self) -> CodecInfo:
        return CodecInfo(
            self.kind,
            self.latent_channels,
            self.scale_factor,
            self.stores_moments,
            vae=self.vae_id,
            revision=self.revision,
            subfolder=self.subfolder,
            downsample=self.downsample,
        )


Codec = PixelCodec | VaeCodec


@dataclass(frozen=True)
class CodecConfig:
    """Which codec encodes the images (recorded in the manifest). Validated when constructed."""

    kind: str = "vae"  # "vae" (diffusers AutoencoderKL) or "pixel" (weight-free)
    vae: str = DEFAULT_VAE  # hub id or local folder written by AutoencoderKL.save_pretrained
    vae_revision: str | None = None  # hub revision (commit, branch or tag); None = default branch
    vae_subfolder: str | None = None  # e.g. "vae" inside a whole-pipeline folder
    space_to_depth: int = 1  # pixel codec: fold f x f pixel blocks into channels (latent side = resolution / f)

    def __post_init__(self) -> None:
        if self.kind not in ("vae", "pixel"):
            raise ValueError(f"unknown codec {self.kind!r}: use 'vae' (AutoencoderKL) or 'pixel' (no weights)")
        if self.space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {self.space_to_depth}")

    def implied_latent_shape(self, resolution: int) -> tuple[tuple[int, int, int], str]:
        """(C, h, w) of the latents this codec will make at `resolution`, without loading any weights, and what it
        rests on: exact for the pixel codec and a local VAE folder, the SD VAE's 4 channels at 1/8 for a hub id."""
        if self.kind == "pixel":
            codec = PixelCodec(self.space_to_depth)
            side = codec.latent_size(resolution)
            return (codec.latent_channels, side, side), "exact"
        config = Path(self.vae) / (self.vae_subfolder or "") / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            down = 2 ** (len(cfg["block_out_channels"]) - 1)
            return (int(cfg["latent_channels"]), resolution // down, resolution // down), f"from {config}"
        return (4, resolution // 8, resolution // 8), "assumed: an SD-style VAE with 4 channels at 1/8 of the side"


def build_codec(config: CodecConfig, device: str | torch.device = "cpu") -> Codec:
    if config.kind == "pixel":
        return PixelCodec(config.space_to_depth)
    return VaeCodec(config.vae, config.vae_revision, config.vae_subfolder, device=device)


def codec_from_info(info: CodecInfo, device: str | torch.device = "cpu") -> Codec:
    """Rebuild the codec a manifest describes."""
    if info.kind == "pixel":
        return PixelCodec(info.space_to_depth or 1)
    if info.kind == "vae":
        return VaeCodec(info.vae or DEFAULT_VAE, info.revision, info.subfolder, device=device)
    raise ValueError(f"unknown codec kind {info.kind!r} in the manifest")


def latent_from_stored(stored: torch.Tensor, info: CodecInfo, generator: torch.Generator | None = None) -> torch.Tensor:
    """What the DiT trains on, from what a shard stores: (N, 2C or C, h, w) -> scaled latent z (N, C, h, w).

    With posterior moments, z = (mean + exp(logvar / 2) * eps) * scale, a fresh eps on every call.
    """
    if not info.stores_moments:
        return stored.float() * info.scale_factor
    mean, logvar = stored.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * info.scale_factor
