"""Codecs: pixel round trip, the diffusers VAE loaded from a local folder in the precision asked for, chunked VAE calls
equal to one pass, latents from stored moments."""

import json

import numpy as np
import pytest
import torch

from pipeline.codecs import (
    VAE_PEAK_ELEMENTS_PER_PIXEL,
    CodecConfig,
    CodecInfo,
    PixelCodec,
    VaeCodec,
    build_codec,
    codec_from_info,
    images_to_tensor,
    latent_from_stored,
    tensor_to_images,
    vae_batch_limit,
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


def test_vae_dtype_round_trips_through_the_manifest(tmp_path):
    """The precision a VAE codec encodes in is recorded, and codec_from_info decodes in it (fp32 if none recorded)."""
    path = save_tiny_vae(tmp_path / "vae")
    codec = build_codec(CodecConfig(kind="vae", vae=str(path), dtype="bf16"))
    assert codec.dtype == torch.bfloat16 and codec.vae.dtype == torch.bfloat16
    info = CodecInfo.from_dict(json.loads(json.dumps(codec.describe().to_dict())))  # as the manifest stores it
    assert info.dtype == "bf16"
    rebuilt = codec_from_info(info)
    assert rebuilt.dtype == torch.bfloat16 and rebuilt.vae.dtype == torch.bfloat16
    assert rebuilt.decode(torch.randn(2, 4, 8, 8)).dtype == torch.float32  # images come back in float32
    before = {k: v for k, v in info.to_dict().items() if k != "dtype"}  # a manifest from before dtype was recorded
    assert codec_from_info(CodecInfo.from_dict(before)).vae.dtype == torch.float32
    assert PixelCodec(2).describe().dtype is None and "dtype" not in PixelCodec(2).describe().to_dict()


def test_vae_defaults_to_fp32_on_a_gpu(tmp_path, monkeypatch):
    """On a (pretend) CUDA device the VAE loads in fp32 unless configured otherwise: moving the model is a no-op here,
    so everything but the device string is what a GPU actor builds."""
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "to", lambda self, *args, **kwargs: self)
    path = save_tiny_vae(tmp_path / "vae")
    codec = build_codec(CodecConfig(kind="vae", vae=str(path)), device="cuda")
    assert codec.device.type == "cuda" and codec.dtype == torch.float32 and codec.vae.dtype == torch.float32
    assert codec.describe().dtype == "fp32" and CodecConfig().dtype == "fp32"


def test_vae_computes_in_its_dtype_inside_a_callers_autocast(tmp_path):
    codec = VaeCodec(str(save_tiny_vae(tmp_path / "vae")))
    z = torch.randn(3, 4, 8, 8)
    plain = codec.decode(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(codec.decode(z), plain)


def test_unknown_dtype_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="codec.dtype 'float32' is not one of fp32, fp16, bf16"):
        CodecConfig(dtype="float32")
    with pytest.raises(ValueError, match="codec.dtype 'bf16' is the VAE's precision.*leave codec.dtype at fp32"):
        CodecConfig(kind="pixel", dtype="bf16")
    info = CodecInfo("vae", 4, 0.18215, True, vae=str(save_tiny_vae(tmp_path / "vae")), dtype="fp8")
    with pytest.raises(ValueError, match="codec.dtype 'fp8'"):
        codec_from_info(info)


def test_chunked_vae_calls_equal_one_pass(tmp_path):
    """Chunks of 3 give one pass's result (to the kernels' batch-size-dependent rounding, ~1e-6 on the CPU), and are
    exactly the chunks decoded on their own, in order, the remainder included."""
    codec = VaeCodec(str(save_tiny_vae(tmp_path / "vae")))
    z = torch.randn(7, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one_pass = codec.decode(z, max_batch=7)
    chunked = codec.decode(z, max_batch=3)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked, torch.cat([codec.decode(z[i : i + 3], max_batch=3) for i in (0, 3, 6)]))
    images = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(
        codec.encode(images, max_batch=2), codec.encode(images, max_batch=7), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        codec.decode(z, max_batch=0)


def test_vae_calls_are_sized_to_memory(tmp_path, monkeypatch):
    """Without max_batch, a call covers at most VAE_MAX_PIXELS_PER_CALL pixels, and on a GPU at most half its free
    memory by the documented peak estimate; at least one image."""
    assert vae_batch_limit(256 * 256, 4) == 32 and vae_batch_limit(512 * 512, 2) == 8
    per_image = VAE_PEAK_ELEMENTS_PER_PIXEL * 4 * 256 * 256  # about 330 MB in fp32 at 256 px
    assert vae_batch_limit(256 * 256, 4, free_bytes=10 * per_image) == 5  # half the free memory
    assert vae_batch_limit(256 * 256, 4, free_bytes=0) == 1
    assert vae_batch_limit(1024 * 1024, 4) == 2 and vae_batch_limit(4096 * 4096, 4) == 1

    codec = VaeCodec(str(save_tiny_vae(tmp_path / "vae")))
    monkeypatch.setattr("pipeline.codecs.VAE_MAX_PIXELS_PER_CALL", 3 * 16 * 16)  # 3 decoded 16 px images per call
    sizes, decode = [], codec.vae.decode
    monkeypatch.setattr(codec.vae, "decode", lambda z: sizes.append(len(z)) or decode(z))
    assert codec.decode(torch.randn(7, 4, 8, 8)).shape == (7, 3, 16, 16) and sizes == [3, 3, 1]
