"""Analytic compute of a DiT in the paper's convention, parameter counts, training compute and MFU.

Convention (paper section 4, confirmed by its authors): forward pass only, one multiply-add counted as one flop
(MACs), attention matmuls included, VAE and elementwise ops excluded. Per block with T tokens of width D:
    qkv 3*T*D^2 + attention (QK^T and AV) 2*T^2*D + out proj T*D^2 + MLP 8*T*D^2 + adaLN 6*D^2
  = 12*T*D^2 + 2*T^2*D + 6*D^2
plus the patch embedding, the timestep MLP and the final layer. The block options change only the MLP term: SwiGLU's
three D x h matrices give 3*T*D*h, with h = 2/3 of GELU's hidden width (the same count when 3 divides 4D); RoPE,
RMSNorm and QK-norm are elementwise and add nothing in this convention. Training compute in the paper = Gflops x batch x
steps x 3 (forward + backward, still MACs); multiply by 2 for true FLOPs, the unit of 6*N*D estimates and of MFU.

MFU is per device: the FLOPs of the whole job's throughput over (devices x one device's peak), the peak being the
dense bf16 tensor-core rate of the vendor's datasheet (DEVICE_PEAKS, looked up by the name CUDA reports).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dit_core.config import DiTConfig

TIMESTEP_FREQUENCY_SIZE = 256


@dataclass(frozen=True)
class ComputeBreakdown:
    """Forward MACs of one image, by part."""

    patch_embed: int
    timestep_mlp: int
    blocks_linear: int  # qkv, out proj, MLP and adaLN of all blocks
    blocks_attention: int  # QK^T and AV matmuls of all blocks
    final_layer: int

    @property
    def total(self) -> int:
        return self.patch_embed + self.timestep_mlp + self.blocks_linear + self.blocks_attention + self.final_layer


def forward_macs(config: DiTConfig) -> ComputeBreakdown:
    """Forward MACs of one image through `config`, split by part."""
    D, T, p, L = config.hidden_size, config.num_tokens, config.patch_size, config.depth
    per_block_linear = T * (3 * D * D + D * D + _mlp_matrices(config) * D * config.mlp_hidden_size) + 6 * D * D
    per_block_attention = 2 * T * T * D
    return ComputeBreakdown(
        patch_embed=T * D * config.in_channels * p * p,
        timestep_mlp=TIMESTEP_FREQUENCY_SIZE * D + D * D,
        blocks_linear=L * per_block_linear,
        blocks_attention=L * per_block_attention,
        final_layer=2 * D * D + T * D * p * p * config.out_channels,
    )


def gflops(config: DiTConfig) -> float:
    """Forward Gflops of one image in the paper's convention (GMACs): 118.6 for DiT-XL/2 at 32x32 latents."""
    return forward_macs(config).total / 1e9


def param_count(config: DiTConfig, include_pos_embed: bool = True) -> int:
    """Parameter count without building the model (675,129,632 for DiT-XL/2 with its fixed pos_embed)."""
    D, C, p, L = config.hidden_size, config.in_channels, config.patch_size, config.depth
    h = config.mlp_hidden_size
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    mlp = linear(D, (_mlp_matrices(config) - 1) * h) + linear(h, D)  # GELU: D -> h -> D; SwiGLU: D -> 2h, h -> D
    qk_norm = 2 * config.head_dim if config.qk_norm else 0  # the gains of q's and k's RMSNorm
    block = linear(D, 3 * D) + linear(D, D) + mlp + linear(D, 6 * D) + qk_norm
    total = (
        (C * p * p * D + D)  # patch embed conv
        + linear(TIMESTEP_FREQUENCY_SIZE, D)
        + linear(D, D)  # timestep MLP
        + (config.num_classes + 1) * D  # label table with the null row
        + L * block
        + linear(D, 2 * D)
        + linear(D, p * p * config.out_channels)  # final layer
    )
    if include_pos_embed and config.positions == "sincos":  # RoPE has no embedding table
        total += config.num_tokens * D
    return total


def _mlp_matrices(config: DiTConfig) -> int:
    """Weight matrices of width D x h in one MLP: 2 for GELU (in, out), 3 for SwiGLU (value, gate, out)."""
    return 2 if config.mlp == "gelu" else 3


def training_compute(config: DiTConfig, global_batch_size: int, steps: int) -> dict[str, float]:
    """Training compute of `steps` steps at `global_batch_size` images per step.

    Returns {"paper_gflops": MACs as the paper counts them (Gflops x batch x steps x 3, in Gflops),
             "flops": true FLOPs (2x the MACs; comparable with 6*N*D)}.
    """
    macs = gflops(config) * 1e9 * 3 * global_batch_size * steps
    return {"paper_gflops": macs / 1e9, "flops": 2 * macs}


def train_mfu(config: DiTConfig, images_per_s: float, peak_flops: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation of training, per device: 6 x forward MACs x images/s over num_devices x peak_flops.

    images_per_s: the throughput of all `num_devices` together (a DDP job's global batch per second);
    peak_flops: one device's peak FLOP/s (device_peak(name).flops for a known GPU)."""
    return 6 * forward_macs(config).total * images_per_s / (num_devices * peak_flops)


# ---------------------------------------------------------------------------------------------------------------
# Peak FLOP/s of one device, for MFU
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    """The dense bf16 peak of one GPU model, as its vendor's datasheet states it."""

    name: str  # regular expression matched against the whole of torch.cuda.get_device_name()
    tflops: float  # dense bf16 tensor-core peak (no 2:4 sparsity; FP32 accumulate), TFLOP/s
    source: str  # the vendor document the figure comes from

    @property
    def flops(self) -> float:
        return self.tflops * 1e12


# Datasheets give bf16 "with sparsity" (2:4 structured) beside or instead of the dense rate: the dense rate is half of
# it, and the dense rate is what a DiT's matmuls can reach. Only devices whose figure is certain are listed; for any
# other device set the peak yourself (train.peak_tflops in the pipeline). A MIG slice is never matched.
DEVICE_PEAKS = (
    DevicePeak(r"NVIDIA H100 80GB HBM3", 989.5, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 1,979 sparse"),
    DevicePeak(r"NVIDIA H100 PCIe", 756.5, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: 1,513 sparse"),
    DevicePeak(r"NVIDIA H100 NVL", 835.5, "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL: 1,671 sparse"),
    DevicePeak(r"NVIDIA H200", 989.5, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: 1,979 sparse"),
    DevicePeak(r"NVIDIA H200 NVL", 835.5, "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: 1,671 sparse"),
    DevicePeak(r"NVIDIA GH200( .*)?", 989.5, "NVIDIA GH200 Grace Hopper Superchip datasheet: 1,979 sparse"),
    DevicePeak(r"NVIDIA A100[- ].*", 312.0, "NVIDIA A100 Tensor Core GPU datasheet: 312 dense, 624 sparse"),
    DevicePeak(r"NVIDIA A10", 125.0, "NVIDIA A10 Tensor Core GPU datasheet: 125 dense, 250 sparse"),
    DevicePeak(r"NVIDIA L4", 121.0, "NVIDIA L4 Tensor Core GPU datasheet: 242 sparse"),
    DevicePeak(r"NVIDIA L40", 181.05, "NVIDIA L40 GPU datasheet: 181.05 dense, 362.1 sparse"),
    DevicePeak(r"NVIDIA L40S", 362.05, "NVIDIA L40S GPU datasheet: 362.05 dense, 733 sparse"),
    DevicePeak(r"NVIDIA B200", 2250.0, "NVIDIA HGX B200 datasheet: 4.5 PFLOPS sparse per GPU"),
    DevicePeak(r"NVIDIA GeForce RTX 4090", 165.2, "NVIDIA Ada GPU Architecture whitepaper: 165.2 with FP32 accumulate"),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The DEVICE_PEAKS entry for a device named as torch.cuda.get_device_name() names it; None if the device is not
    listed or is a MIG slice (a fraction of the GPU's SMs)."""
    if "MIG" in device_name:
        return None
    return next((p for p in DEVICE_PEAKS if re.fullmatch(p.name, device_name.strip())), None)
