"""The architecture of a DiT as data: its design options, its config, the model sizes and the presets.

`DiTOptions` are the design choices a study may vary (the pipeline's experiments nest them as their `model`
section); `DiTConfig` adds a size (depth, width, heads, patch) and the data's shape. Presets are named
`DiT-<size>/<patch>` as in the paper: the four sizes of its Table 1 and a tiny family for CPU studies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

# The values of each block option; the first is the paper's (the default).
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "positions": ("sincos", "rope"),
    "mlp": ("gelu", "swiglu"),
    "norm": ("layernorm", "rmsnorm"),
}


@dataclass(frozen=True)
class DiTOptions:
    """Design choices of a DiT beyond its size and its data: what a study may put on a grid axis.

    A pipeline experiment nests these as its `model` section; `DiTConfig` extends them with the size and data
    fields, so each option is declared here once and reaches the model, the Gflops count and the checkpoint.
    """

    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("grad_checkpointing",)  # change the cost, not the weights

    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * D (SwiGLU: 2/3 of it, for the same parameters)
    class_dropout_prob: float = 0.1  # probability, in training mode, that a label is replaced by the null class
    grad_checkpointing: bool = False  # recompute each block in backward (saves activation memory, costs ~1/3 time)
    positions: str = "sincos"  # "sincos": fixed 2D sin-cos added to the tokens (the paper); "rope": 2D axial RoPE
    mlp: str = "gelu"  # "gelu": Linear-GELU(tanh)-Linear (the paper); "swiglu": Linear-(SiLU(gate) * value)-Linear
    norm: str = "layernorm"  # "layernorm" (the paper) or "rmsnorm": the norm before attention, MLP and final layer
    qk_norm: bool = False  # RMS-normalise q and k per head (learned gain) before the attention logits

    def __post_init__(self) -> None:
        self.validate_options()

    def validate_options(self) -> None:
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        for name, choices in OPTION_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be true or false, got {self.qk_norm!r}")

    @property
    def options(self) -> DiTOptions:
        """The design options alone (of a DiTConfig: without its size and data fields)."""
        return DiTOptions(**{f.name: getattr(self, f.name) for f in fields(DiTOptions)})


@dataclass(frozen=True)
class DiTConfig(DiTOptions):
    """Architecture of one DiT: the options, a size, and the data's shape. Validated when constructed."""

    input_size: int = 32  # latent height = width, in latent pixels (32 for 256 px images through the SD VAE)
    patch_size: int = 2  # p: side of a square patch, in latent pixels; tokens T = (input_size / p)^2
    in_channels: int = 4  # C: latent channels (4 for the SD VAE, 3 for the pixel codec)
    hidden_size: int = 1152  # D: token width
    depth: int = 28  # number of DiT blocks
    num_heads: int = 16  # attention heads; head dim = hidden_size / num_heads
    num_classes: int = 1000  # class labels 0..num_classes-1; label num_classes is the null (unconditional) class
    learn_sigma: bool = True  # output 2C channels: C for the prediction, C for the variance interpolation v

    def __post_init__(self) -> None:
        self.validate()

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError, naming the field and the fix, if this config cannot build a DiT."""
        self.validate_options()
        positive = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"patch size {self.patch_size} does not divide the latent size {self.input_size}: "
                f"choose a patch size among {[p for p in (1, 2, 4, 8, 16) if self.input_size % p == 0]} "
                f"or change the resolution"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.positions == "sincos" and self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")
        if self.positions == "rope" and self.head_dim % 4:
            raise ValueError(
                f"positions='rope' rotates pairs of each head's dims along two axes, so the head dimension must be a "
                f"multiple of 4; hidden_size {self.hidden_size} / num_heads {self.num_heads} = {self.head_dim}: "
                f"change num_heads or use positions='sincos'"
            )

    @property
    def mlp_hidden_size(self) -> int:
        """The MLP's hidden width: int(mlp_ratio * D) for GELU; for SwiGLU int(2/3 of that), so that its three
        matrices (value, gate: D x h; out: h x D) hold as many weights as GELU's two (exactly when 3 divides it)."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return hidden if self.mlp == "gelu" else int(2 * hidden / 3)


# Model sizes: (depth, hidden size D, heads). The paper's four (Table 1), then a tiny family for CPU studies and tests
# (not in the paper), named by depth and width so that the names sort by compute per token (~ depth x D^2).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "d1w48": (1, 48, 2),
    "d2w48": (2, 48, 2),
    "d2w64": (2, 64, 2),
    "d3w64": (3, 64, 2),
    "d4w128": (4, 128, 4),
    "d6w128": (6, 128, 4),
}
PAPER_SIZES = ("S", "B", "L", "XL")
PATCH_SIZES = (2, 4, 8)
# Names the tiny sizes had before they became one family; an old name is refused with its new one.
RENAMED_SIZES = {"Femto": "d1w48", "Pico": "d2w48", "Ti": "d2w64", "Mini": "d3w64", "Mi": "d4w128", "Nano": "d6w128"}

# "DiT-XL/2": DiTConfig(...) for every size x patch. Data-dependent fields (input_size, in_channels,
# num_classes) take the paper's ImageNet-256 defaults; override them with `dit_config(name, **overrides)`.
PRESETS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(patch_size=p, depth=depth, hidden_size=width, num_heads=heads)
    for size, (depth, width, heads) in SIZES.items()
    for p in PATCH_SIZES
}


def _unknown_preset(name: str) -> ValueError:
    size = name.removeprefix("DiT-").split("/")[0]
    if size in RENAMED_SIZES:
        new = name.replace(f"DiT-{size}/", f"DiT-{RENAMED_SIZES[size]}/")
        return ValueError(
            f"the tiny size {size!r} is now called {RENAMED_SIZES[size]!r} (depth and width): "
            f"use {new!r} instead of {name!r}"
        )
    return ValueError(f"unknown DiT preset {name!r}; known presets: {', '.join(PRESETS)}")


def dit_config(name: str, options: DiTOptions | None = None, **overrides) -> DiTConfig:
    """The preset `name` (e.g. "DiT-XL/2") with its design `options` and fields replaced by `overrides`, validated."""
    if name not in PRESETS:
        raise _unknown_preset(name)
    unknown = set(overrides) - {f.name for f in fields(DiTConfig)}
    if unknown:
        raise ValueError(f"unknown DiTConfig fields {sorted(unknown)}; fields: {[f.name for f in fields(DiTConfig)]}")
    chosen = {f.name: getattr(options, f.name) for f in fields(DiTOptions)} if options is not None else {}
    return replace(PRESETS[name], **{**chosen, **overrides})


def parse_preset(name: str) -> tuple[str, int]:
    """'DiT-XL/2' -> ('XL', 2)."""
    if name not in PRESETS:
        raise _unknown_preset(name)
    size, patch = name.removeprefix("DiT-").split("/")
    return size, int(patch)
