"""Codecs: pixel round trip, the diffusers VAE loaded from a local folder, latents from stored moments."""

import numpy as np
import pytest
import torch

from pipeline.codecs import (
    CodecConfig,
    CodecInfo,
    PixelCodec,
    VaeCodec,
    build_codec,
    codec_from_info,
    images_to_tensor,
    latent_from_stored,
    tensor_to_images,
)
from tests.helpers import save_tiny_vae


def test_uint8_conversions_follow_the_paper():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = images_to_tensor(images)
    assert x.shape == (1, 3, 16, 16) and x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(tensor_to_images(x), images)  # clamp(127.5 x + 128) truncates back exactly
    assert tensor_to_images(torch.full((1, 3, 1, 1), 5.0)).max() == 255


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_pixel_codec_round_trip(factor):
    codec = PixelCodec(factor)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 3 * factor**2, 16 // factor, 16 // factor) and codec.latent_size(16) == 16 // factor
    torch.testing.assert_close(codec.decode(z), x)
    rebuilt = codec_from_info(CodecInfo.from_dict(codec.describe().to_dict()))  # through the manifest's JSON
    assert isinstance(rebuilt, PixelCodec) and rebuilt.space_to_depth == factor


def test_vae_codec_from_local_folder(tmp_path):
    path = save_tiny_vae(tmp_path / "vae")
    codec = build_codec(CodecConfig(kind="vae", vae=str(path)))
    assert isinstance(codec, VaeCodec) and codec.scale_factor == pytest.approx(0.18215)
    assert codec.latent_size(32) == 16 and codec.latent_channels == 4
    moments = codec.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert moments.shape == (2, 8, 16, 16)
    images = codec.decode(torch.randn(2, 4, 16, 16))
    assert images.shape == (2, 3, 32, 32)
    rebuilt = codec_from_info(CodecInfo.from_dict(codec.describe().to_dict()))  # through the manifest's JSON
    assert rebuilt.vae_id == str(path)


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load the VAE"):
        VaeCodec(str(tmp_path / "no-such-vae"))


def test_latent_from_moments_samples_the_posterior():
    mean = torch.full((20000, 1, 1, 1), 0.5)
    logvar = torch.full((20000, 1, 1, 1), np.log(0.04))
    info = CodecInfo("vae", latent_channels=1, scale_factor=2.0, stores_moments=True)
    z = latent_from_stored(torch.cat([mean, logvar], dim=1).half(), info, torch.Generator().manual_seed(0))
    assert z.shape == (20000, 1, 1, 1)
    assert z.mean().item() == pytest.approx(1.0, abs=0.01)  # 2 * 0.5
    assert z.std().item() == pytest.approx(0.4, rel=0.02)  # 2 * 0.2
    pixels = torch.randn(3, 3, 4, 4)
    pixel = CodecInfo("pixel", latent_channels=3, scale_factor=1.0, stores_moments=False, space_to_depth=1)
    torch.testing.assert_close(latent_from_stored(pixels, pixel), pixels)


def test_implied_latent_shape_needs_no_weights(tmp_path):
    assert CodecConfig(kind="pixel", space_to_depth=2).implied_latent_shape(32) == ((12, 16, 16), "exact")
    shape, basis = CodecConfig(kind="vae", vae=str(save_tiny_vae(tmp_path / "vae"))).implied_latent_shape(32)
    assert shape == (4, 16, 16) and "config.json" in basis  # the tiny VAE halves the side once
    shape, basis = CodecConfig(kind="vae", vae="some-org/some-vae").implied_latent_shape(256)
    assert shape == (4, 32, 32) and basis.startswith("assumed")


def test_bad_codec_config():
    with pytest.raises(ValueError, match="unknown codec"):
        CodecConfig(kind="png")
    with pytest.raises(ValueError, match="space_to_depth"):
        CodecConfig(kind="pixel", space_to_depth=0)
    with pytest.raises(ValueError, match="not divisible"):
        PixelCodec(3).latent_size(16)
