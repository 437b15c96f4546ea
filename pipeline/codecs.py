"""Image <-> latent codecs: the diffusers AutoencoderKL (hub id or local folder) and a weight-free pixel codec.

Images enter as float tensors (N, 3, H, W) in [-1, 1]; the DiT sees latents z (N, C, h, w) already multiplied by the
codec's scale factor. What a shard stores per image is `encode(images)`:

- vae: the posterior moments [mean, logvar] (2C, h, w) of diffusers' AutoencoderKL, so that training draws fresh
  posterior noise every step: z = (mean + exp(logvar / 2) * eps) * scale_factor (0.18215 for the SD VAEs).
- pixel: the image itself (C = 3 f^2 channels after an optional f x f space-to-depth), scale factor 1. No weights,
  no download: the pipeline and FID stay meaningful offline.

The VAE computes in `CodecConfig.dtype` (fp32 by default on every device: exact to the fp16 the shards store; bf16
keeps 8 mantissa bits). It is called on at most `vae_batch_limit` images at a time, however many it is given: its
activations grow with the batch (about 165 MB per 256 px image in fp32), and an FID batch of 250 would need tens of GB.

`describe()` gives the `CodecInfo` the manifest records, precision included; `codec_from_info` rebuilds the codec
from it (the FID stage decodes with the codec, in the precision, that made the shards).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
VAE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # codec.dtype -> torch dtype

# Peak activation memory of an SD-style VAE (widths 128-256-512-512) in one encode or decode call, per image pixel,
# in elements of its dtype: 165 MB more peak RSS per extra 256 px image in fp32 on CPU (encode and decode alike;
# 2026-12, diffusers 0.42), i.e. 630 elements per pixel, doubled for GPU convolution workspaces and allocator slack.
VAE_PEAK_ELEMENTS_PER_PIXEL = 1250
VAE_MAX_PIXELS_PER_CALL = 32 * 256 * 256  # at most 32 images at 256 px (8 at 512 px) per call on any device
VAE_FREE_MEMORY_FRACTION = 0.5  # on a GPU, a call's estimated peak stays within this share of the free memory


def vae_dtype(name: str) -> torch.dtype:
    """The torch dtype of a codec.dtype name, or a ValueError that names the field and the choices."""
    if name not in VAE_DTYPES:
        raise ValueError(
            f"codec.dtype {name!r} is not one of {', '.join(VAE_DTYPES)}: the precision the VAE encodes and decodes "
            f"in (fp32, the default, is exact to the fp16 the shards store)"
        )
    return VAE_DTYPES[name]


def vae_batch_limit(image_pixels: int, element_bytes: int, free_bytes: int | None = None) -> int:
    """Images per VAE call (at least 1): at most VAE_MAX_PIXELS_PER_CALL pixels, and with `free_bytes` (a GPU's free
    memory) at most VAE_FREE_MEMORY_FRACTION of it by the peak estimate VAE_PEAK_ELEMENTS_PER_PIXEL.

    image_pixels: H x W of one image (decoded side for decode); element_bytes: 4 for fp32, 2 for fp16/bf16.
    """
    limit = VAE_MAX_PIXELS_PER_CALL // image_pixels
    if free_bytes is not None:
        per_image = VAE_PEAK_ELEMENTS_PER_PIXEL * element_bytes * image_pixels
        limit = min(limit, int(VAE_FREE_MEMORY_FRACTION * free_bytes) // per_image)
    return max(1, limit)


def free_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can use on a CUDA device (free in the driver + cached by PyTorch); None elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


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
    dtype: str | None = None  # vae: precision it encoded in and decodes in ("fp32", "fp16", "bf16"); None: pixel,
    # or a vae manifest written before the precision was recorded (decoded in fp32)

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
    def encode(self, images: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> stored latent (N, C, h, w). One pass (max_batch: as VaeCodec's, not needed)."""
        return F.pixel_unshuffle(images, self.space_to_depth) if self.space_to_depth > 1 else images

    @torch.no_grad()
    def decode(self, z: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """Scaled latent z (N, C, h, w) -> images (N, 3, H, W), nominally in [-1, 1]. One pass (see encode)."""
        return F.pixel_shuffle(z, self.space_to_depth) if self.space_to_depth > 1 else z

    def describe(self) -> CodecInfo:
        return CodecInfo(
            self.kind, self.latent_channels, self.scale_factor, self.stores_moments, space_to_depth=self.space_to_depth
        )


class VaeCodec:
    """diffusers AutoencoderKL loaded with from_pretrained(hub id or local folder), on GPU or CPU, in `dtype`.

    encode and decode compute in `dtype` (autocast off) and take any batch, calling the VAE on at most `batch_limit`
    images at a time; the result equals one pass up to the kernels' batch-size-dependent rounding (about 1e-6 in fp32
    on the CPU, below the resolution of the fp16 the shards store).
    """

    kind = "vae"
    stores_moments = True

    def __init__(
        self,
        vae: str = DEFAULT_VAE,
        revision: str | None = None,
        subfolder: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
    ):
        from diffusers import AutoencoderKL

        self.vae_id, self.revision, self.subfolder = vae, revision, subfolder
        self.device = torch.device(device)
        self.dtype_name, self.dtype = dtype, vae_dtype(dtype)  # the same on every device: no silent bf16 on GPU
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

    def batch_limit(self, height: int, width: int) -> int:
        """Images of H x W pixels per VAE call: vae_batch_limit with this device's free memory, now."""
        return vae_batch_limit(height * width, self.dtype.itemsize, free_memory(self.device))

    def _chunks(self, x: torch.Tensor, image_side: tuple[int, int], max_batch: int | None) -> tuple[torch.Tensor, ...]:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (or None: sized to memory), got {max_batch}")
        return x.split(max_batch or self.batch_limit(*image_side))

    def _own_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off around the VAE: it computes in its dtype even when called inside a caller's autocast."""
        return (
            torch.autocast(self.device.type, enabled=False)
            if self.device.type in ("cpu", "cuda")
            else contextlib.nullcontext()
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> posterior moments [mean, logvar] (N, 2C, h, w), float32 on the CPU.

        max_batch: images per VAE call; None = `batch_limit` (sized to memory).
        """
        out = []
        with self._own_precision():
            for chunk in self._chunks(images, images.shape[-2:], max_batch):
                posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
                out.append(torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu())  # (n, 2C, h, w)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
        """Scaled latent z (N, C, h, w) -> images (N, 3, H, W) float32 on the codec's device, nominally in [-1, 1].

        max_batch: latents per VAE call; None = `batch_limit` at the decoded size (sized to memory).
        """
        side = (z.shape[-2] * self.downsample, z.shape[-1] * self.downsample)
        out = []
        with self._own_precision():
            for chunk in self._chunks(z, side, max_batch):
                out.append(self.vae.decode(chunk.to(self.device, self.dtype) / self.scale_factor).sample.float())
        return torch.cat(out)

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
            dtype=self.dtype_name,
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
    # vae: precision of encoding (prepare) and decoding (fid), "fp32", "fp16" or "bf16"; fp32 = exact to the fp16 the
    # shards store, the default on every device. Part of the shard identity: shards of two precisions never mix.
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.kind not in ("vae", "pixel"):
            raise ValueError(f"unknown codec {self.kind!r}: use 'vae' (AutoencoderKL) or 'pixel' (no weights)")
        if self.space_to_depth < 1:
            raise ValueError(f"space_to_depth must be >= 1, got {self.space_to_depth}")
        vae_dtype(self.dtype)
        if self.kind == "pixel" and self.dtype != "fp32":
            raise ValueError(
                f"codec.dtype {self.dtype!r} is the VAE's precision; the pixel codec stores the image as it is: "
                f"leave codec.dtype at fp32 with codec.kind=pixel"
            )

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
    return VaeCodec(config.vae, config.vae_revision, config.vae_subfolder, device=device, dtype=config.dtype)


def codec_from_info(info: CodecInfo, device: str | torch.device = "cpu") -> Codec:
    """Rebuild the codec a manifest describes, in the precision it records (fp32 where it records none)."""
    if info.kind == "pixel":
        return PixelCodec(info.space_to_depth or 1)
    if info.kind == "vae":
        return VaeCodec(
            info.vae or DEFAULT_VAE, info.revision, info.subfolder, device=device, dtype=info.dtype or "fp32"
        )
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
