"""DiT model: presets, official key layout, init, guidance, input checks, compile-ability."""

import math

import numpy as np
import pytest
import torch

from dit_core.config import PAPER_SIZES, PATCH_SIZES, PRESETS, RENAMED_SIZES, SIZES, DiTOptions, dit_config
from dit_core.model import DiT, TimestepEmbedder, sincos_pos_embed_2d
from tests.dit_core.builders import official_xl2_shapes, randomize, tiny_dit


def test_xl2_state_dict_matches_official_keys_and_shapes():
    with torch.device("meta"):
        model = DiT.from_preset("DiT-XL/2")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_xl2_shapes()
    assert len(expected) == 292
    assert got == expected


def test_xl2_parameter_count():
    with torch.device("meta"):
        model = DiT.from_preset("DiT-XL/2")
    assert model.num_params() == 675_129_632
    assert model.num_params(trainable_only=True) == 674_834_720


@pytest.mark.parametrize("name", [n for n in PRESETS if n.split("-")[1].split("/")[0] in ("S", "B", "L", "XL")])
def test_paper_preset_output_shapes_on_meta(name):
    with torch.device("meta"):
        model = DiT.from_preset(name)
        x = torch.empty(2, 4, 32, 32)
        out = model(x, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 32, 32)
    assert model.config.num_tokens == (32 // model.config.patch_size) ** 2


@pytest.mark.parametrize("patch", PATCH_SIZES)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_tiny_preset_output_shapes(patch, learn_sigma):
    model = tiny_dit(f"DiT-d2w64/{patch}", input_size=16, in_channels=3, num_classes=5, learn_sigma=learn_sigma)
    out = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)


def test_zero_output_at_init():
    model = tiny_dit()
    out = model(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 11, (4,)))
    assert torch.count_nonzero(out) == 0
    # ... and the gradient still reaches the zero-initialised output layer
    loss = (model(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))) - 1).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_init_distributions():
    model = DiT.from_preset("DiT-S/8", input_size=32)
    table = model.y_embedder.embedding_table.weight
    assert abs(table.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    w = model.blocks[0].attn.qkv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    conv = model.x_embedder.proj.weight
    conv_bound = math.sqrt(6 / (conv.shape[0] + conv[0].numel()))
    assert conv.abs().max() <= conv_bound and conv.abs().max() > 0.9 * conv_bound
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert not model.pos_embed.requires_grad


def test_pos_embed_matches_mae_formula():
    """Independent numpy version of the MAE 2D sin-cos embedding (meshgrid w first; first half from grid[0])."""
    D, n = 32, 4
    omega = 1.0 / 10000 ** (np.arange(D // 4, dtype=np.float64) / (D / 4))
    grid_w, grid_h = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64))  # 'xy' indexing

    def one_d(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    expected = np.concatenate([one_d(grid_w), one_d(grid_h)], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(D, n).numpy(), expected, atol=1e-12)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = TimestepEmbedder.sinusoid(t, 256)
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(
        emb[:, :128].numpy(), np.cos(t.numpy()[:, None] * freqs), atol=1e-4
    )  # float32 args up to 500
    np.testing.assert_allclose(emb[:, 128:].numpy(), np.sin(t.numpy()[:, None] * freqs), atol=1e-4)


@pytest.mark.parametrize("channels", [None, 3])
def test_guided_forward_equals_two_passes(channels):
    model = randomize(tiny_dit()).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([3, 400, 999]), torch.tensor([0, 5, 9])
    scale = 2.5
    guided = model.forward_with_cfg(x, t, y, scale, guidance_channels=channels)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    g = 4 if channels is None else channels
    expected = torch.cat([uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g]), cond[:, g:]], dim=1)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    if channels == 3:  # the 4th latent channel and the variance stay conditional
        torch.testing.assert_close(guided[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)


def test_label_dropout_in_training_only():
    model = tiny_dit(class_dropout_prob=0.5)
    y = torch.zeros(2000, dtype=torch.long)
    model.train()
    dropped = model.y_embedder.drop_labels(y)
    assert 0.4 < (dropped == 10).float().mean() < 0.6
    model = randomize(model).eval()
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])
    torch.testing.assert_close(model(x, t, labels), model(x, t, labels))  # eval: no random dropout
    forced = model.y_embedder(torch.tensor([3, 4]), train=False, force_drop=torch.tensor([True, False]))
    table = model.y_embedder.embedding_table.weight
    torch.testing.assert_close(forced, table[[10, 4]])


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = randomize(tiny_dit())
    b = randomize(tiny_dit(grad_checkpointing=True))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    a.train(), b.train()
    a.y_embedder.dropout_prob = b.y_embedder.dropout_prob = 0.0
    a(x, t, y).pow(2).mean().backward()
    b(x, t, y).pow(2).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_compiles_without_graph_breaks():
    model = randomize(tiny_dit()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y))
    guided = torch.compile(model.forward_with_cfg, fullgraph=True, backend="eager")
    torch.testing.assert_close(guided(x, t, y, 2.0), model.forward_with_cfg(x, t, y, 2.0))


def test_bf16_autocast_forward_close_to_fp32():
    model = randomize(tiny_dit()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.tensor([1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown DiT preset 'DiT-XXL/2'.*DiT-XL/2"):
        DiT.from_preset("DiT-XXL/2")


def test_tiny_family_names_sort_by_compute_and_old_names_point_to_new_ones():
    tiny = [size for size in SIZES if size not in PAPER_SIZES]
    per_token = [depth * width**2 for depth, width, _ in (SIZES[s] for s in tiny)]
    assert tiny == sorted(tiny) and per_token == sorted(per_token)  # names, in order, are in order of compute
    assert all(s == f"d{SIZES[s][0]}w{SIZES[s][1]}" for s in tiny)  # and say what they are
    for old, new in RENAMED_SIZES.items():
        with pytest.raises(ValueError, match=f"now called '{new}'.*'DiT-{new}/4' instead of 'DiT-{old}/4'"):
            dit_config(f"DiT-{old}/4")


def test_options_are_part_of_every_config_and_validated_when_built():
    options = DiTOptions(mlp_ratio=2.0, class_dropout_prob=0.2)
    config = dit_config("DiT-S/2", options)
    assert (config.mlp_ratio, config.class_dropout_prob, config.options) == (2.0, 0.2, options)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        DiTOptions(class_dropout_prob=1.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        dit_config("DiT-S/2", mlp_ratio=0)


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match="patch size 8 does not divide the latent size 12"):
        dit_config("DiT-S/8", input_size=12)


def test_wrong_channel_count():
    model = tiny_dit()
    with pytest.raises(ValueError, match=r"expects latents of shape \(N, 4, 8, 8\).*got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2]))


def test_wrong_spatial_size():
    with pytest.raises(ValueError, match="input_size=8"):
        tiny_dit()(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2]))


@pytest.mark.parametrize("labels", [[0, 11], [-1, 3]])
def test_labels_out_of_range(labels):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        tiny_dit()(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor(labels))


def test_float_labels_rejected():
    with pytest.raises(ValueError, match="integer tensor"):
        tiny_dit()(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        dit_config("DiT-S/2", hidden=3)


def test_guidance_channels_range():
    with pytest.raises(ValueError, match="guidance_channels"):
        tiny_dit().forward_with_cfg(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1]), 2.0, 5)
