"""DiT: the Diffusion Transformer of Peebles & Xie (arXiv 2212.09748), adaLN-Zero variant.

One file, top to bottom: embedders, the transformer block, the final layer, the model; its config and the presets are
dit_core/config.py.
Parameter names and shapes match the official implementation, so an official checkpoint loads with
`load_state_dict(strict=True)`; the code is our own.

Shapes: N batch, C latent channels, H = W = input_size, p patch size, T = (H / p)^2 tokens, D hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dit_core.config import DiTConfig, dit_config

# ---------------------------------------------------------------------------------------------------------------
# Embedders: patches, timesteps, labels; positions (fixed 2D sin-cos, or 2D rotary); the norms
# ---------------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, with per-sample (N, D) shift and scale broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): 256-dim [cos, sin] sinusoid, then Linear - SiLU - Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) float timesteps -> (N, dim); frequencies exp(-ln(max_period) * i / (dim/2)), output [cos, sin]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.sinusoid(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, y: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with dropout_prob, or where force_drop is true."""
        if force_drop is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
        else:
            drop = force_drop.bool()
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, y: torch.Tensor, train: bool, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop is not None:
            y = self.drop_labels(y, force_drop)
        return self.embedding_table(y)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE convention), (grid_size^2, D), float64.

    Tokens are ordered row-major (row i, column j). The first D/2 dims encode the column j, the last D/2 the row i;
    each half is [sin(pos * omega), cos(pos * omega)] with omega_k = 1 / 10000^(k / (D/4)), k < D/4.
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, D/2)
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)  # (T, D)


def rope_2d_tables(head_dim: int, grid_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, head_dim) of 2D axial rotary embeddings (Su et al., RoFormer; axial as in LightningDiT).

    The first head_dim/2 dims of q and k rotate with the token's row i, the last head_dim/2 with its column j. Within
    each half of m = head_dim/2 dims, dim k and dim k + m/2 form a pair rotated by the angle pos * base^(-k / (m/2)).
    """
    m = head_dim // 2
    freqs = base ** (-torch.arange(m // 2, dtype=torch.float64) / (m // 2))  # (m/2,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij"
    )
    angles = [pos.reshape(-1, 1) * freqs[None] for pos in (rows, cols)]  # 2 x (T, m/2)
    angles = torch.cat([torch.cat([a, a], dim=1) for a in angles], dim=1)  # (T, head_dim): each pair's angle twice
    return angles.cos().float(), angles.sin().float()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, heads, T, hd) queries or keys by the tables of `rope_2d_tables`: x * cos + rotate(x) * sin.

    The rotation is computed in fp32 (or x's dtype if wider) and returned in x's dtype: under bf16 autocast q and k
    are rounded once, after the rotation, rather than the tables, each product and the sum being rounded to bf16.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x_rot = x.to(dtype)
    half = x.shape[-1] // 2
    rotated = []
    for part in (x_rot[..., :half], x_rot[..., half:]):  # the row half, the column half
        a, b = part.chunk(2, dim=-1)
        rotated.append(torch.cat([-b, a], dim=-1))
    return (x_rot * cos.to(dtype) + torch.cat(rotated, dim=-1) * sin.to(dtype)).to(x.dtype)


def make_norm(kind: str, hidden_size: int) -> nn.Module:
    """The pre-attention / pre-MLP norm, without affine parameters (adaLN supplies shift and scale)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# DiT block with adaLN-Zero conditioning (paper section 3.2)
# ---------------------------------------------------------------------------------------------------------------


Rope = tuple[torch.Tensor, torch.Tensor] | None  # the (cos, sin) tables of rope_2d_tables, or None (no RoPE)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and torch SDPA (flash / memory-efficient kernels).

    Options: `qk_norm` RMS-normalises q and k over each head's dims (one learned gain per dim, shared by the heads)
    before the logits; `rope` tables rotate q and k by the tokens' 2D positions.
    """

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        head_dim = hidden_size // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads)  # (N, T, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope_2d(q, *rope), apply_rope_2d(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, hd)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Linear(D, 4D) - GELU(tanh) - Linear(4D, D)."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size, bias=True)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Linear(h, D)(SiLU(x W_gate) * (x W_value)) (Shazeer 2020); value and gate as one fused Linear(D, 2h)."""

    def __init__(self, hidden_size: int, mlp_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * mlp_hidden_size, bias=True)  # [value, gate]
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)  # each (N, T, h)
        return self.fc2(F.silu(gate) * value)


class DiTBlock(nn.Module):
    """x = x + gate_msa * Attn(modulate(LN(x))); x = x + gate_mlp * MLP(modulate(LN(x))); modulation from c."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        D = config.hidden_size
        self.norm1 = make_norm(config.norm, D)
        self.attn = Attention(D, config.num_heads, config.qk_norm)
        self.norm2 = make_norm(config.norm, D)
        self.mlp = (Mlp if config.mlp == "gelu" else SwiGLU)(D, config.mlp_hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Rope = None) -> torch.Tensor:
        # x: (N, T, D) tokens; c: (N, D) timestep + label conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(D, p*p*out_channels) per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*out)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer.

    `forward(x, t, y)` maps a noisy latent x (N, C, H, W), timesteps t (N,) in [0, 1000) (float or int) and labels
    y (N,) in [0, num_classes] (num_classes = null class) to (N, out_channels, H, W): the C-channel prediction
    (epsilon, x0 or v, as the diffusion process defines), followed by C variance channels when learn_sigma is on.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        grid = config.input_size // config.patch_size
        if config.positions == "sincos":
            # Fixed, not trained, but kept in the state_dict as the official checkpoints have it.
            pos = sincos_pos_embed_2d(D, grid).float().unsqueeze(0)  # (1, T, D)
            self.pos_embed = nn.Parameter(pos, requires_grad=False)
        else:  # RoPE: no additive embedding; the rotation tables are derived, not state
            self.pos_embed = None
            cos, sin = rope_2d_tables(config.head_dim, grid)  # (T, hd) each
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels, config.norm)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiT:
        """DiT.from_preset("DiT-XL/2", input_size=32, num_classes=1000)."""
        return cls(dit_config(name, **overrides))

    def initialize_weights(self) -> None:
        """All weight init in one place (adaLN-Zero: the model outputs zeros at init)."""

        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier_linear)
        if self.pos_embed is not None:
            with torch.no_grad():
                pos = sincos_pos_embed_2d(self.config.hidden_size, self.config.input_size // self.config.patch_size)
                self.pos_embed.copy_(pos.float().unsqueeze(0))
        # Patch embedding like a Linear on its flattened (D, C*p*p) view.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-init every modulation output and the output projection.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) -> (N, C_out, H, W)."""
        c, p = self.config.out_channels, self.config.patch_size
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT expects latents of shape (N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}) "
                f"(in_channels={cfg.in_channels}, input_size={cfg.input_size}), got {tuple(x.shape)}; "
                f"build the model with the data's channel count and latent size"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t and y must have shape ({x.shape[0]},) to match x, got t {tuple(t.shape)} and y {tuple(y.shape)}"
            )
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels y must be an integer tensor, got {y.dtype}")
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > cfg.num_classes):
            raise ValueError(
                f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class), "
                f"got min {int(y.min())} max {int(y.max())}"
            )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W). force_drop (N,) bool forces the null label."""
        if not torch.compiler.is_compiling():
            self._check_inputs(x, t, y)
        x = self.x_embedder(x)  # (N, T, D)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        else:
            rope = (self.rope_cos, self.rope_sin)  # (T, hd) each
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop)  # (N, D)
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        x = self.final_layer(x, c)  # (N, T, p*p*out)
        return self.unpatchify(x)  # (N, out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | None = None,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched pass: out = uncond + s * (cond - uncond).

        Conditional and unconditional halves run as one batch of 2N. Guidance applies to the first
        `guidance_channels` output channels (default: all C prediction channels; 3 reproduces the official
        sampler exactly); the other prediction channels and the variance channels come from the conditional pass.
        Returns (N, out_channels, H, W).
        """
        C = self.config.in_channels
        g = C if guidance_channels is None else guidance_channels
        if not 1 <= g <= C:
            raise ValueError(f"guidance_channels must be in [1, {C}], got {guidance_channels}")
        null = torch.full_like(y, self.config.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, out, H, W); compiled if self is
        cond, uncond = out.chunk(2, dim=0)
        guided = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=1)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
