"""Analytic Gflops against the paper's Table 4 and torch's FlopCounterMode; params; training compute; MFU and the
devices' peaks."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_core.config import dit_config
from dit_core.flops import DEVICE_PEAKS, device_peak, forward_macs, gflops, param_count, train_mfu, training_compute
from dit_core.model import DiT

# Table 4 of the paper: Gflops of each preset at 256 px (32x32x4 latents), 2 decimals.
TABLE4_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}  # fmt: skip


@pytest.mark.parametrize("name", TABLE4_GFLOPS)
def test_table4_gflops(name):
    ours, paper = gflops(dit_config(name)), TABLE4_GFLOPS[name]
    # Within 0.5% of the table, or within its rounding to 2 decimals where that is larger (S/8: 0.358 vs 0.36).
    assert abs(ours - paper) <= max(0.005 * paper, 0.005)


def test_flop_counter_agrees_except_attention():
    """torch's FlopCounterMode counts every Linear/conv (it misses SDPA on the CPU); attention checked separately."""
    config = dit_config("DiT-S/4")
    model = DiT(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.tensor([3]))
    counted = counter.get_total_flops() / 2  # FLOPs -> MACs
    macs = forward_macs(config)
    assert counted == macs.total - macs.blocks_attention
    # Attention matmuls QK^T and AV for one block, counted by FlopCounterMode on explicit matmuls.
    T, D, h = config.num_tokens, config.hidden_size, config.num_heads
    q = k = v = torch.randn(1, h, T, D // h)
    with FlopCounterMode(display=False) as counter:
        (q @ k.transpose(-2, -1)).softmax(-1) @ v
    assert counter.get_total_flops() / 2 * config.depth == macs.blocks_attention


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2", "DiT-d2w64/4"])
def test_param_count_matches_model(name):
    config = dit_config(name)
    with torch.device("meta"):
        model = DiT(config)
    assert param_count(config) == model.num_params()
    assert param_count(config, include_pos_embed=False) == model.num_params(trainable_only=True)


def test_training_compute_conventions():
    config = dit_config("DiT-XL/2")
    c = training_compute(config, global_batch_size=256, steps=400_000)
    assert c["paper_gflops"] == pytest.approx(gflops(config) * 256 * 400_000 * 3)
    assert c["flops"] == pytest.approx(2 * c["paper_gflops"] * 1e9)


def test_mfu_matches_reference_anchor():
    # measured for the official XL/2 on one H200: bf16 + compile, 520 img/s = 46.9% MFU at 790 TFLOP/s.
    assert train_mfu(dit_config("DiT-XL/2"), 520, 790e12) == pytest.approx(0.469, abs=0.001)


def test_mfu_is_per_device():
    """A DDP job's throughput over N devices is N devices' work: the same MFU as one device doing 1/N of it."""
    config = dit_config("DiT-B/2")
    assert train_mfu(config, 8 * 150.0, 989.5e12, num_devices=8) == pytest.approx(train_mfu(config, 150.0, 989.5e12))
    assert train_mfu(config, 1000.0, 1e15, num_devices=2) == pytest.approx(6 * gflops(config) * 1e9 * 1000 / 2e15)


# Names as torch.cuda.get_device_name() reports them, with the dense bf16 figure (TFLOP/s) of the vendor's datasheet.
KNOWN_DEVICES = {
    "NVIDIA H100 80GB HBM3": 989.5,  # H100 SXM
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.5,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.5,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A10": 125.0,
    "NVIDIA L4": 121.0,
    "NVIDIA L40": 181.05,
    "NVIDIA L40S": 362.05,
    "NVIDIA B200": 2250.0,
    "NVIDIA GeForce RTX 4090": 165.2,
}


@pytest.mark.parametrize("name", KNOWN_DEVICES)
def test_device_peak_by_name(name):
    peak = device_peak(name)
    assert peak is not None and peak.tflops == KNOWN_DEVICES[name] and peak.flops == KNOWN_DEVICES[name] * 1e12
    assert sum(re.fullmatch(p.name, name) is not None for p in DEVICE_PEAKS) == 1  # no entry shadows another
    assert "datasheet" in peak.source or "whitepaper" in peak.source


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA A10G",  # AWS's variant: no NVIDIA datasheet figure
        "NVIDIA GeForce RTX 4090 D",  # fewer SMs than the RTX 4090
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice: a seventh of the SMs
        "Tesla V100-SXM2-16GB",  # no bf16 tensor cores
        "NVIDIA H800",
        "cpu",
    ],
)
def test_an_unlisted_device_has_no_peak(name):
    assert device_peak(name) is None
