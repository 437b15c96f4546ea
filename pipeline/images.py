"""Image folders in ImageNet layout: listing them deterministically, and reading one image as the model sees it.

    src/<class>/.../<image>.{jpg,jpeg,png,webp,bmp}   class index = position of <class> in the sorted folder names

`load_image` turns the bytes of one file into the ADM center crop (the official DiT's preprocessing: halve with a box
filter while the short side is at least twice the target, bicubic resize of the short side, center crop) in RGB, or
raises SkipInput with the reason the file cannot be used. The prepare stage and the FID reference statistics read
images through this module, so both see the same crop.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class SkipInput(Exception):
    """An input image that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class SourceListing:
    root: str  # the source as given (path or URI)
    class_names: list[str]  # sorted class folder names; index = label
    files: list[tuple[str, int]]  # (path relative to root, label), sorted

    def sha256(self) -> str:
        h = hashlib.sha256()
        for rel, label in self.files:
            h.update(f"{rel}\t{label}\n".encode())
        return h.hexdigest()


def list_source(src: str) -> SourceListing:
    """List an ImageNet-layout folder deterministically; errors name what is missing."""
    fs, root = fsspec.core.url_to_fs(src)
    if not fs.exists(root):
        raise FileNotFoundError(f"source folder {src} does not exist")
    if not fs.isdir(root):
        raise ValueError(f"source {src} is not a folder: give the folder holding one subfolder per class")
    root = root.rstrip("/")
    class_dirs = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p) and not is_hidden(p))
    if not class_dirs:
        raise ValueError(f"source folder {src} has no class subfolders: expected {src}/<class>/<image>.jpg")
    class_names = [p.rstrip("/").rsplit("/", 1)[-1] for p in class_dirs]
    files = []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(fs.find(class_dir)):
            rel = path[len(root) + 1 :]
            if path.lower().endswith(IMAGE_EXTENSIONS) and not any(is_hidden(part) for part in rel.split("/")):
                files.append((rel, label))
    if not files:
        raise ValueError(f"source folder {src} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return SourceListing(src, class_names, files)


def is_hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def center_crop_adm(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's crop: halve with a box filter while the short side >= 2 * resolution, bicubic resize of the short side
    to `resolution`, then center crop to resolution x resolution."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled to 8 bits, CMYK/palette
    converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(data: bytes, resolution: int, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes of an image file -> (uint8 (R, R, 3) crop, original (width, height)); SkipInput with the reason."""
    if not data:
        raise SkipInput("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SkipInput(f"too large ({width}x{height} > {max_pixels} pixels; possible decompression bomb)")
            image.load()
    except SkipInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipInput(f"decompression bomb: {exc}") from None
    except Exception as exc:  # truncated, corrupt, not an image
        message = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise SkipInput(f"unreadable image: {type(exc).__name__}: {message}") from None
    if min(width, height) < 1:
        raise SkipInput(f"degenerate size {width}x{height}")
    try:
        crop = center_crop_adm(to_rgb(image), resolution)
    except Exception as exc:
        raise SkipInput(f"cannot convert mode {image.mode}: {type(exc).__name__}: {exc}") from None
    return np.asarray(crop, dtype=np.uint8), (width, height)
