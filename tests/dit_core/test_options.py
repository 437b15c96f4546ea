"""The block options (positions, MLP, norm, QK-norm): direct formulas, every combination, params and Gflops."""

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_core.config import OPTION_CHOICES, DiTConfig, DiTOptions, dit_config
from dit_core.flops import forward_macs, gflops, param_count
from dit_core.model import Attention, DiT, SwiGLU, apply_rope_2d, make_norm, rope_2d_tables
from tests.dit_core.builders import tiny_config

COMBINATIONS = [
    dict(positions=pos, mlp=mlp, norm=norm, qk_norm=qk)
    for pos, mlp, norm, qk in itertools.product(*OPTION_CHOICES.values(), (False, True))
]


D2W48 = dict(preset="DiT-d2w48/2", in_channels=3, num_classes=5)


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_combination_builds_outputs_zero_at_init_and_counts_its_params_and_flops(options):
    config = tiny_config(**D2W48, options=DiTOptions(**options))
    torch.manual_seed(0)
    model = DiT(config).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(x, t, y)
    assert out.shape == (2, 6, 8, 8)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero, whatever the block
    assert param_count(config) == model.num_params()
    macs = forward_macs(config)
    assert counter.get_total_flops() / 2 / 2 == macs.total - macs.blocks_attention  # 2 images; SDPA not counted
    # After a step of training the options do change the function: the output is no longer zero and finite.
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    assert torch.isfinite(model(x, t, y)).all()


def test_defaults_are_the_official_architecture():
    assert DiTOptions() == DiTOptions(positions="sincos", mlp="gelu", norm="layernorm", qk_norm=False)
    keys = set(DiT(tiny_config(**D2W48, options=DiTOptions())).state_dict())
    assert "pos_embed" in keys and not any("q_norm" in k for k in keys)
    rope_keys = set(DiT(tiny_config(**D2W48, options=DiTOptions(positions="rope", qk_norm=True))).state_dict())
    assert "pos_embed" not in rope_keys and "blocks.0.attn.q_norm.weight" in rope_keys


def test_swiglu_keeps_the_gelu_weight_count_exactly_when_three_divides_4d_and_within_one_column_otherwise():
    weights = lambda c, n: n * c.hidden_size * c.mlp_hidden_size  # noqa: E731
    for preset in ("DiT-S/2", "DiT-B/4", "DiT-L/2", "DiT-XL/2", "DiT-d2w48/2", "DiT-d3w64/2", "DiT-d6w128/4"):
        gelu, swiglu = dit_config(preset), dit_config(preset, DiTOptions(mlp="swiglu"))
        assert swiglu.mlp_hidden_size == 2 * gelu.mlp_hidden_size // 3
        L, D, h = gelu.depth, gelu.hidden_size, swiglu.mlp_hidden_size
        if (4 * D) % 3 == 0:  # S, B, XL, d2w48: the same weights and Gflops; only the MLP biases differ
            assert weights(swiglu, 3) == weights(gelu, 2)
            assert gflops(swiglu) == gflops(gelu)
            assert param_count(gelu) - param_count(swiglu) == L * (4 * D - 2 * h)
        else:  # L, d3w64, d6w128: h rounds down, short of GELU by less than one column of three matrices
            assert 0 < weights(gelu, 2) - weights(swiglu, 3) < 3 * D
            assert 0.99 < gflops(swiglu) / gflops(gelu) < 1


def test_swiglu_against_its_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 6)
    x = torch.randn(3, 5, 8)
    w, b = mlp.fc1.weight, mlp.fc1.bias
    value = x @ w[:6].T + b[:6]
    gate = x @ w[6:].T + b[6:]
    expected = (gate * torch.sigmoid(gate) * value) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), expected)


def test_rmsnorm_and_layernorm_against_their_formulas():
    x = torch.randn(4, 7, 16) * 3 + 1
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(make_norm("rmsnorm", 16)(x), rms)
    ln = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(make_norm("layernorm", 16)(x), ln)
    assert not list(make_norm("rmsnorm", 16).parameters())  # adaLN supplies scale and shift


def test_qk_norm_normalises_queries_and_keys_per_head():
    torch.manual_seed(0)
    attn = Attention(16, 2, qk_norm=True)
    with torch.no_grad():
        attn.q_norm.weight.copy_(torch.linspace(0.5, 2, 8))
        attn.k_norm.weight.copy_(torch.linspace(2, 0.5, 8))
    x = torch.randn(2, 5, 16) * 10
    q, k, v = attn.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    rms = lambda a: a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k = rms(q) * attn.q_norm.weight, rms(k) * attn.k_norm.weight
    logits = q @ k.transpose(-2, -1) / 8**0.5
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected)


def test_rope_logits_depend_only_on_the_relative_offset():
    """Place the same query and key at two positions; shifting both by the same (row, column) offset keeps q.k."""
    grid, hd = 8, 16
    cos, sin = rope_2d_tables(hd, grid)
    torch.manual_seed(0)
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def logit(pq, pk):
        rows = torch.zeros(1, 1, grid * grid, hd, dtype=torch.float64)
        at = lambda v, p: apply_rope_2d(rows + v, cos.double(), sin.double())[0, 0, p[0] * grid + p[1]]  # noqa: E731
        return float(at(q, pq) @ at(k, pk))

    base = logit((1, 2), (3, 1))
    for shift in ((1, 0), (0, 3), (4, 4), (2, 1)):
        shifted = logit((1 + shift[0], 2 + shift[1]), (3 + shift[0], 1 + shift[1]))
        assert shifted == pytest.approx(base, abs=1e-5)  # float32 tables
    assert logit((1, 2), (3, 2)) != pytest.approx(base, abs=1e-3)  # another offset, another logit
    # A rotation: norms unchanged, and position 0 is the identity.
    rotated = apply_rope_2d(q.expand(1, 1, grid * grid, hd), cos.double(), sin.double())[0, 0]
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(grid * grid))
    torch.testing.assert_close(rotated[0], q)


def test_rope_rotates_in_fp32_under_bf16_autocast():
    """bf16 queries rotated under autocast come back in bf16, rounded once from the exact rotation: every element
    within half a bf16 ulp of it (at most 2^-8 relative). Rotating in bf16 (the tables, both products and the sum
    rounded) misses that on 14% of the elements, by up to 133% where the two terms cancel."""
    cos, sin = rope_2d_tables(16, 8)
    q = torch.randn(4, 4, 64, 16, generator=torch.Generator().manual_seed(0)).bfloat16()  # (N, heads, T, hd)
    exact = apply_rope_2d(q.double(), cos.double(), sin.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotated = apply_rope_2d(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    error = (rotated.double() - exact).abs()
    assert (error <= 2**-8 * exact.abs() + 1e-12).all(), (error / exact.abs()).max()


def test_rope_logit_table_is_a_function_of_the_offset_alone():
    """Every token holds the same q and k: the (T, T) logit table then depends only on (row, column) offsets."""
    grid, hd = 4, 8
    cos, sin = rope_2d_tables(hd, grid)
    torch.manual_seed(1)
    q = torch.randn(1, 1, 1, hd, dtype=torch.float64).expand(1, 1, grid * grid, hd)
    k = torch.randn(1, 1, 1, hd, dtype=torch.float64).expand(1, 1, grid * grid, hd)
    cos, sin = cos.double(), sin.double()
    logits = (apply_rope_2d(q, cos, sin) @ apply_rope_2d(k, cos, sin).transpose(-2, -1))[0, 0]
    by_offset: dict[tuple[int, int], list[float]] = {}
    for a, b in itertools.product(range(grid * grid), repeat=2):
        offset = (b // grid - a // grid, b % grid - a % grid)
        by_offset.setdefault(offset, []).append(float(logits[a, b]))
    assert len(by_offset) == (2 * grid - 1) ** 2
    for values in by_offset.values():
        assert max(values) - min(values) < 1e-5
    assert len({round(v[0], 6) for v in by_offset.values()}) > 1  # and the offset matters


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(positions="alibi"), "unknown positions 'alibi'; choose one of sincos, rope"),
        (dict(mlp="geglu"), "unknown mlp 'geglu'; choose one of gelu, swiglu"),
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'"),
        (dict(qk_norm="yes"), "qk_norm must be true or false"),
    ],
)
def test_unknown_option_values_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DiTOptions(**options)


def test_rope_needs_a_head_dimension_divisible_by_4():
    with pytest.raises(ValueError, match="head dimension must be a multiple of 4.*= 6"):
        DiTConfig(hidden_size=48, num_heads=8, positions="rope")
    DiTConfig(hidden_size=48, num_heads=8)  # sin-cos positions do not care


def test_diffusers_export_refuses_the_options_it_cannot_represent():
    from dit_core.interop import diffusers_config

    diffusers_config(tiny_config(**D2W48, options=DiTOptions()))  # the official block exports
    with pytest.raises(ValueError, match="this model sets {'mlp': 'swiglu'}"):
        diffusers_config(tiny_config(**D2W48, options=DiTOptions(mlp="swiglu")))
