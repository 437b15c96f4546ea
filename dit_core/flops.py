"""Analytic compute of a DiT in the paper's convention, parameter counts, training compute and MFU.

Convention (paper section 4, confirmed by its authors): forward pass only, one multiply-add counted as one flop
(MACs), attention matmuls included, VAE and elementwise ops excluded. Per block with T tokens of width D:
    qkv 3*T*D^2 + attention (QK^T and AV) 2*T^2*D + out proj T*D^2 + MLP 8*T*D^2 + adaLN 6*D^2
  = 12*T*D^2 + 2*T^2*D + 6*D^2
plus the patch embedding, the timestep MLP and the final layer. The block options change only the MLP term: SwiGLU's
three D x h matrices give 3*T*D*h, with h = 2/3 of GELU's hidden width (the same count when 3 divides 4D); RoPE,
RMSNorm and QK-norm are elementwise and add nothing in this convention. Training compute in the paper = Gflops x batch x
steps x 3 (forward + backward, still MACs); multiply by 2 for true FLOPs, the unit of 6*N*D estimates and of MFU.
"""

from __future__ import annotations

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


def train_mfu(config: DiTConfig, images_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of training: 6 x forward MACs x images/s over the peak FLOP/s of the hardware."""
    return 6 * forward_macs(config).total * images_per_s / peak_flops


# Dense bf16 matrix rate measured on one NVIDIA H200 (a large bf16 matmul); the reference for MFU.
H200_BF16_PEAK_FLOPS = 790e12
