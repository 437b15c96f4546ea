"""A procedural, class-conditional toy image dataset in ImageNet folder layout, for scaling studies on a CPU.

A study on a 2-core machine cannot train on ImageNet, but it still needs images whose classes differ visibly and
vary within a class, so that loss and FID can tell a good model from a bad one.
Each class is a shape (disc, square, ..., two dots) drawn at a random size, position, rotation and colour. In the
"color" style each class also has its own hue and fill texture, on a gradient background, at 35-75% of the image side;
in the "simple" style the shapes are grey/white on a plain dark background at 45-75% of the side (the data a small
model learned to draw fastest in a 2-core feasibility study).

    OUT/c00_disc/00000.jpg ... OUT/c09_two_dots/00499.jpg
    OUT/toy_data.json          the config and counts, written last: its presence means the dataset is complete

Every image is a pure function of (seed, class index, image index, resolution, style): the same config gives
byte-identical files, and a larger `per_class` keeps the earlier images unchanged. Running the same call again on a
finished folder does nothing, on an interrupted one finishes it; a folder that holds another config or unrelated files
is refused.

    python -c "from pipeline.toy import ToyDataConfig, write_toy_dataset; write_toy_dataset('toy', ToyDataConfig())"
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CLASS_NAMES = ("disc", "square", "triangle", "plus", "ring", "ellipse", "diamond", "stripes", "checker", "two_dots")
STYLES = ("color", "simple")
MIN_RESOLUTION = 8
TOY_DATA_FILE = "toy_data.json"  # written last: the dataset is complete
PARTIAL_FILE = "toy_data.partial.json"  # written first: an interrupted run with this config may be finished
DRAWING_VERSION = 1  # bump when a change to the drawing code changes the images of an existing config

SUPERSAMPLE = 4  # shapes are drawn at this multiple of the resolution, then box-filtered down (antialiasing)
EDGE_MARGIN = 0.04  # fraction of the image side kept free between a shape and the border
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # 4:4:4; the default 4:2:0 would smear the class colours over 2x2 pixels at 16-32 px


@dataclass(frozen=True)
class ToyDataConfig:
    num_classes: int = 10  # the first num_classes entries of CLASS_NAMES, 1..10
    per_class: int = 500  # images per class
    resolution: int = 32  # image side in pixels, >= 8
    seed: int = 0  # dataset seed; image (c, i) is drawn from numpy.random.default_rng([seed, c, i])
    style: str = "color"  # "color": coloured, textured shapes on gradients; "simple": grey/white shapes on dark

    def __post_init__(self) -> None:
        _require_int("num_classes", self.num_classes, 1, len(CLASS_NAMES))
        _require_int("per_class", self.per_class, 1)
        _require_int("resolution", self.resolution, MIN_RESOLUTION)
        _require_int("seed", self.seed, 0)
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")

    @property
    def num_images(self) -> int:
        return self.num_classes * self.per_class


def _require_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ValueError unless value is an int in [low, high]."""
    valid = f"an integer in {low}..{high}" if high is not None else f"an integer >= {low}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        extra = f" (there are {high} toy classes: {', '.join(CLASS_NAMES)})" if name == "num_classes" else ""
        raise ValueError(f"{name} must be {valid}, got {value}{extra}")


def class_folder(index: int) -> str:
    """Folder name of class `index`, e.g. "c00_disc"; sorting the names gives the class order."""
    _require_int("class index", index, 0, len(CLASS_NAMES) - 1)
    return f"c{index:02d}_{CLASS_NAMES[index]}"


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: polygons in units of the image side, centred on the origin, before rotation and placement.
# `size` is the shape's nominal extent (disc diameter, square side); fill 255 draws the shape, 0 cuts a hole.
# ---------------------------------------------------------------------------------------------------------------------

Polygon = tuple[np.ndarray, int]  # ((N, 2) points, fill)


def _ellipse_points(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    """(n, 2) points on an axis-aligned ellipse."""
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(theta), cy + ry * np.sin(theta)], axis=1)


def _rect_points(half_w: float, half_h: float, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    """(4, 2) corners of an axis-aligned rectangle."""
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]]) + [cx, cy]


def _disc(rng: np.random.Generator, size: float) -> list[Polygon]:
    return [(_ellipse_points(size / 2, size / 2), 255)]


def _square(rng: np.random.Generator, size: float) -> list[Polygon]:
    return [(_rect_points(size / 2, size / 2), 255)]


def _triangle(rng: np.random.Generator, size: float) -> list[Polygon]:
    circumradius = 1.1 * size / np.sqrt(3)  # equilateral, side 1.1 * size
    angles = np.deg2rad([-90.0, 30.0, 150.0])
    return [(circumradius * np.stack([np.cos(angles), np.sin(angles)], axis=1), 255)]


def _plus(rng: np.random.Generator, size: float) -> list[Polygon]:
    half_bar = size * rng.uniform(0.13, 0.17)
    return [(_rect_points(size / 2, half_bar), 255), (_rect_points(half_bar, size / 2), 255)]


def _ring(rng: np.random.Generator, size: float) -> list[Polygon]:
    inner = size / 2 * rng.uniform(0.5, 0.62)
    return [(_ellipse_points(size / 2, size / 2), 255), (_ellipse_points(inner, inner), 0)]


def _ellipse(rng: np.random.Generator, size: float) -> list[Polygon]:
    return [(_ellipse_points(size / 2, size / 2 * rng.uniform(0.4, 0.58)), 255)]


def _diamond(rng: np.random.Generator, size: float) -> list[Polygon]:
    half_h = 1.05 * size / 2
    half_w = half_h * rng.uniform(0.55, 0.7)
    return [(np.array([[0.0, -half_h], [half_w, 0.0], [0.0, half_h], [-half_w, 0.0]]), 255)]


def _stripes(rng: np.random.Generator, size: float) -> list[Polygon]:
    bar = size / 5  # three bars, two gaps
    return [(_rect_points(bar / 2, size / 2, cx=k * bar), 255) for k in (-2, 0, 2)]


def _checker(rng: np.random.Generator, size: float) -> list[Polygon]:
    cell = size / 4
    centres = [(-1.5 + i) * cell for i in range(4)]
    return [
        (_rect_points(cell / 2, cell / 2, cx=centres[i], cy=centres[j]), 255)
        for i in range(4)
        for j in range(4)
        if (i + j) % 2 == 0
    ]


def _two_dots(rng: np.random.Generator, size: float) -> list[Polygon]:
    r = size * rng.uniform(0.17, 0.22)
    return [(_ellipse_points(r, r, cx=-(size / 2 - r)), 255), (_ellipse_points(r, r, cx=size / 2 - r), 255)]


@dataclass(frozen=True)
class _ShapeSpec:
    draw: Callable[[np.random.Generator, float], list[Polygon]]
    max_rotation_deg: float  # rotation drawn from U(-max, max); small where a large one would mimic another class
    texture: str  # "color" style fill: "flat", "speckle" (per-pixel noise) or "shaded" (linear ramp)


SHAPES: dict[str, _ShapeSpec] = {
    "disc": _ShapeSpec(_disc, 0.0, "flat"),
    "square": _ShapeSpec(_square, 15.0, "speckle"),  # beyond ~20 degrees a square starts to read as a diamond
    "triangle": _ShapeSpec(_triangle, 180.0, "shaded"),
    "plus": _ShapeSpec(_plus, 20.0, "flat"),
    "ring": _ShapeSpec(_ring, 0.0, "speckle"),
    "ellipse": _ShapeSpec(_ellipse, 180.0, "shaded"),
    "diamond": _ShapeSpec(_diamond, 15.0, "flat"),
    "stripes": _ShapeSpec(_stripes, 180.0, "speckle"),
    "checker": _ShapeSpec(_checker, 15.0, "shaded"),
    "two_dots": _ShapeSpec(_two_dots, 180.0, "flat"),
}

SIZE_RANGE = {"color": (0.35, 0.75), "simple": (0.45, 0.75)}  # shape extent as a fraction of the image side


def _place(polygons: list[Polygon], rng: np.random.Generator, max_rotation_deg: float) -> list[Polygon]:
    """Rotate the shape by a random angle and move it to a random position that keeps it inside the image."""
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotated = [(points @ rotation.T, fill) for points, fill in polygons]
    all_points = np.concatenate([points for points, _ in rotated])
    low = EDGE_MARGIN - all_points.min(axis=0)  # (2,) smallest offset that keeps the shape off the left/top edge
    high = 1.0 - EDGE_MARGIN - all_points.max(axis=0)
    # A shape wider than the free area (a large stripes patch near 45 degrees) is centred; its corners touch the edge.
    offset = np.where(low <= high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), (low + high) / 2)
    return [(points + offset, fill) for points, fill in rotated]


def _coverage(polygons: list[Polygon], resolution: int) -> np.ndarray:
    """(H, W, 1) fraction of each pixel the shape covers: drawn at SUPERSAMPLE x, box-filtered down."""
    side = SUPERSAMPLE * resolution
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in polygons:
        draw.polygon((points * side).ravel().tolist(), fill=fill)
    small = mask.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[:, :, None] / 255.0


def _ramp(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """(H, W, 1) linear ramp from 0 to 1 across the image along a random direction."""
    angle = rng.uniform(0.0, 2 * np.pi)
    coords = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # (H, W) in [-0.71, 0.71]
    return (ramp / np.sqrt(2) + 0.5)[:, :, None]


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _colors_color(rng: np.random.Generator, class_index: int, texture: str, res: int) -> tuple[np.ndarray, ...]:
    """(background, foreground) (H, W, 3) in [0, 1]: a dark gradient with grain, a class-hued textured fill."""
    hue = class_index / len(CLASS_NAMES) + rng.uniform(-0.03, 0.03)  # one hue per class, 36 degrees apart
    foreground = np.broadcast_to(_hsv(hue, rng.uniform(0.55, 0.9), rng.uniform(0.75, 1.0)), (res, res, 3))
    if texture == "speckle":
        foreground = foreground * (1.0 + rng.normal(0.0, 0.18, (res, res, 1)).astype(np.float32))
    elif texture == "shaded":
        foreground = foreground * (0.55 + 0.55 * _ramp(rng, res))
    bg_hue = rng.uniform(0.0, 1.0)
    start = _hsv(bg_hue, rng.uniform(0.15, 0.5), rng.uniform(0.1, 0.45))
    end = _hsv(bg_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.15, 0.5), rng.uniform(0.1, 0.45))
    t = _ramp(rng, res)
    background = (1 - t) * start + t * end + rng.normal(0.0, 0.03, (res, res, 3)).astype(np.float32)
    return background, foreground


def _colors_simple(rng: np.random.Generator, res: int) -> tuple[np.ndarray, ...]:
    """(background, foreground) (H, W, 3) in [0, 1]: a plain dark grey, a light grey to white fill."""
    background = np.full((res, res, 3), rng.uniform(0.0, 0.12), dtype=np.float32)
    foreground = np.full((res, res, 3), rng.uniform(0.7, 1.0), dtype=np.float32)
    return background, foreground


def draw_image(config: ToyDataConfig, class_index: int, image_index: int) -> Image.Image:
    """Draw image `image_index` of class `class_index`: an RGB image of config.resolution pixels a side.

    The image depends only on (config.seed, class_index, image_index, config.resolution, config.style): all its
    randomness comes from numpy.random.default_rng([config.seed, class_index, image_index]).
    """
    _require_int("class_index", class_index, 0, config.num_classes - 1)
    _require_int("image_index", image_index, 0)
    rng = np.random.default_rng([config.seed, class_index, image_index])
    spec = SHAPES[CLASS_NAMES[class_index]]
    res = config.resolution

    size = rng.uniform(*SIZE_RANGE[config.style])
    polygons = _place(spec.draw(rng, size), rng, spec.max_rotation_deg)
    alpha = _coverage(polygons, res)  # (H, W, 1)
    if config.style == "color":
        background, foreground = _colors_color(rng, class_index, spec.texture, res)
    else:
        background, foreground = _colors_simple(rng, res)
    pixels = (1.0 - alpha) * background + alpha * foreground  # (H, W, 3)
    return Image.fromarray(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------------------------------


def _record(config: ToyDataConfig) -> dict:
    """What toy_data.json holds: the config, the drawing version and the counts."""
    return {
        "config": asdict(config),
        "drawing_version": DRAWING_VERSION,
        "num_images": config.num_images,
        "class_folders": [class_folder(c) for c in range(config.num_classes)],
    }


def _summary(root: Path, config: ToyDataConfig) -> dict:
    return {
        "root": str(root.resolve()),
        **asdict(config),
        "num_images": config.num_images,
        "class_folders": [class_folder(c) for c in range(config.num_classes)],
    }


def _check_same_config(path: Path, config: ToyDataConfig) -> None:
    """Raise ValueError unless the record at `path` was written for `config` by this drawing version."""
    try:
        stored = json.loads(path.read_text())
        wanted = {**asdict(config), "drawing_version": DRAWING_VERSION}
        have = {**stored["config"], "drawing_version": stored.get("drawing_version")}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a toy dataset record ({exc}); choose another folder") from exc
    differing = [f"{k}: folder has {have.get(k)!r}, asked for {v!r}" for k, v in wanted.items() if have.get(k) != v]
    if differing:
        raise ValueError(
            f"{path.parent} already holds a toy dataset with another config ({'; '.join(differing)}); "
            "choose another folder, or delete this one to redraw it"
        )


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_jpeg_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # hidden and not *.jpg: image-folder loaders skip it
    image.save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    os.replace(tmp, path)


def write_toy_dataset(out_dir: str | os.PathLike, config: ToyDataConfig, progress: bool = True) -> dict:
    """Write every image of `config` to `out_dir` in ImageNet layout and return a summary of the dataset.

    Args:
        out_dir: the dataset folder; it must not exist, be empty, or hold a toy dataset of the same config
            (finished: nothing is done; interrupted: the missing images are drawn). Anything else is a ValueError.
        config: what to draw.
        progress: show a tqdm bar over the images.

    Returns:
        {root, num_classes, per_class, resolution, seed, style, num_images, class_folders}, root an absolute path.
    """
    root = Path(out_dir)
    done, partial = root / TOY_DATA_FILE, root / PARTIAL_FILE
    if done.exists():
        _check_same_config(done, config)
        return _summary(root, config)
    if partial.exists():
        _check_same_config(partial, config)  # an interrupted run of this config: finish it
    elif root.exists():
        if not root.is_dir():
            raise ValueError(f"{root} exists and is not a folder; choose another output folder")
        if any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and holds no {TOY_DATA_FILE}; refusing to write a toy dataset into it, "
                "choose a new or empty folder"
            )

    root.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(partial, _record(config))
    with tqdm(total=config.num_images, desc=f"toy data -> {root}", unit="img", disable=not progress) as bar:
        for c in range(config.num_classes):
            folder = root / class_folder(c)
            folder.mkdir(exist_ok=True)
            for i in range(config.per_class):
                path = folder / f"{i:05d}.jpg"
                if not path.exists():  # files appear only whole (renamed into place), so an existing one is done
                    _save_jpeg_atomic(draw_image(config, c, i), path)
                bar.update()
    _write_json_atomic(done, _record(config))
    partial.unlink()
    return _summary(root, config)
