"""Official checkpoints in, diffusers out and back, and the exported DiTPipeline."""

import pytest
import torch

from dit_core.config import dit_config
from dit_core.interop import (
    config_from_state_dict,
    export_diffusers_pipeline,
    from_diffusers,
    load_diffusers_transformer,
    load_official_checkpoint,
    to_diffusers,
)
from dit_core.model import DiT
from tests.dit_core.builders import official_xl2_shapes, randomize, tiny_dit
from tests.helpers import tiny_vae


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 421, 999]), torch.tensor([1, 9, 10])


def test_official_xl2_layout_gives_the_xl2_config():
    shapes = official_xl2_shapes()
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert config_from_state_dict(state) == dit_config("DiT-XL/2")
    with torch.device("meta"):
        model = DiT(config_from_state_dict(state))
    model.load_state_dict(state, strict=True, assign=True)


def test_load_official_raw_state_dict_and_train_dict(tmp_path):
    model = randomize(tiny_dit()).eval()
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    ema = randomize(tiny_dit()).eval()
    randomize(ema, seed=5)
    torch.save(
        {
            "model": model.state_dict(),
            "ema": {f"module.{k}": v for k, v in ema.state_dict().items()},
            "opt": {},
            "args": {},
        },
        tmp_path / "train.pt",
    )
    x, t, y = inputs()
    loaded = load_official_checkpoint(tmp_path / "raw.pt", num_heads=2).eval()
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)
    from_ema = load_official_checkpoint(tmp_path / "train.pt", use="ema", num_heads=2).eval()
    torch.testing.assert_close(from_ema(x, t, y), ema(x, t, y), rtol=0, atol=0)
    from_model = load_official_checkpoint(tmp_path / "train.pt", use="model", num_heads=2).eval()
    torch.testing.assert_close(from_model(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_official_head_count_needed_for_unknown_sizes(tmp_path):
    state = DiT(dit_config("DiT-S/8", hidden_size=96, num_heads=3, depth=1)).state_dict()
    with pytest.raises(ValueError, match="pass num_heads"):
        load_official_checkpoint(state)
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "nope.pt")


def test_to_diffusers_matches_and_round_trips():
    model = randomize(tiny_dit()).eval()
    x, t, y = inputs()
    transformer = to_diffusers(model).eval()
    with torch.no_grad():
        ours, theirs = model(x, t, y), transformer(x, t, y).sample
    assert (ours - theirs).abs().max() < 1e-5
    back = from_diffusers(transformer).eval()
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_saved_diffusers_model_and_timestep_shift(tmp_path):
    """save_pretrained + load_diffusers_transformer matches dit_core; plain from_pretrained keeps diffusers' shift."""
    from diffusers import DiTTransformer2DModel

    model = randomize(tiny_dit()).eval()
    to_diffusers(model).save_pretrained(tmp_path / "dit")
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
        fixed = load_diffusers_transformer(str(tmp_path / "dit")).eval()(x, t, y).sample
        plain = DiTTransformer2DModel.from_pretrained(tmp_path / "dit").eval()(x, t, y).sample
    assert (ours - fixed).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-4  # the documented frequency-shift difference


def test_export_diffusers_pipeline(tmp_path):
    from diffusers import DiTPipeline

    # DiTPipeline's guidance hard-codes the null label 1000: a 1000-class model guides, others sample unguided.
    for num_classes, guidance in ((1000, 1.5), (10, 1.0)):
        model = randomize(tiny_dit(num_classes=num_classes)).eval()
        labels = {i: f"class{i}" for i in range(num_classes)}
        export_diffusers_pipeline(model, tmp_path / f"pipe{num_classes}", vae=tiny_vae(), id2label=labels)
        pipe = DiTPipeline.from_pretrained(tmp_path / f"pipe{num_classes}")
        assert pipe.get_label_ids(["class3"]) == [3]
        images = pipe(
            class_labels=[3, 7],
            num_inference_steps=4,
            guidance_scale=guidance,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
