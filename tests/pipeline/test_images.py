"""Reading one image as the model sees it: the ADM crop, and the guard against decompression bombs."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import SkipInput, center_crop_adm, load_image


def test_decompression_bomb_guard():
    data = io.BytesIO()
    Image.new("L", (3000, 3000)).save(data, format="PNG")
    with pytest.raises(SkipInput, match="too large"):
        load_image(data.getvalue(), 16, max_pixels=1_000_000)


def test_adm_center_crop():
    image = Image.fromarray((np.random.default_rng(0).random((300, 700, 3)) * 255).astype(np.uint8))
    crop = center_crop_adm(image, 64)  # 700x300 -> box-halved twice to 175x75 -> bicubic 149x64 -> center 64x64
    assert crop.size == (64, 64)
