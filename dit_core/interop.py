"""Interop: official DiT checkpoints in, diffusers out (and back).

Official checkpoints (facebookresearch/DiT) have exactly our parameter names, so they load strictly; we only infer
the architecture from the tensor shapes. diffusers' `DiTTransformer2DModel` holds the same weights under other names,
splits qkv into three projections and keeps a copy of the timestep/label embedders in every block.

One numerical difference matters: diffusers' DiT timestep embedding divides the frequency exponent by 127 instead of
128 (`Timesteps(downscale_freq_shift=1)`); with official weights that changes outputs by up to ~0.26. The shift is not
part of the diffusers config, so it is not saved: `to_diffusers` and `load_diffusers_transformer` set it to 0 on the
module they return, and a model loaded with plain `DiTTransformer2DModel.from_pretrained` still uses 1.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from dit_core.config import SIZES, DiTConfig, DiTOptions
from dit_core.ema import unwrap_model
from dit_core.model import DiT

# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints in
# ---------------------------------------------------------------------------------------------------------------


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def config_from_state_dict(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Infer the DiTConfig of an official-layout state dict from its tensor shapes.

    The head count is not visible in the shapes: it is looked up from the paper's sizes by (depth, width) unless
    `num_heads` is given.
    """
    try:
        proj = state_dict["x_embedder.proj.weight"]  # (D, C, p, p)
        final = state_dict["final_layer.linear.weight"]  # (p*p*out, D)
        table = state_dict["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        pos = state_dict["pos_embed"]  # (1, T, D)
        fc1 = state_dict["blocks.0.mlp.fc1.weight"]  # (mlp, D)
    except KeyError as missing:
        raise ValueError(f"not an official DiT state dict: key {missing} is missing") from None
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    out_channels = final.shape[0] // (patch * patch)
    grid = int(round(pos.shape[1] ** 0.5))
    if num_heads is None:
        matches = [heads for d, w, heads in SIZES.values() if (d, w) == (depth, hidden)]
        if not matches:
            raise ValueError(f"cannot tell the head count of a depth-{depth}, width-{hidden} DiT: pass num_heads")
        num_heads = matches[0]
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=fc1.shape[0] / hidden,
        num_classes=table.shape[0] - 1,
        learn_sigma=out_channels == 2 * channels,
    )


def load_official_checkpoint(
    source: str | os.PathLike | dict[str, Any], use: str = "ema", num_heads: int | None = None
) -> DiT:
    """A DiT with the weights of an official checkpoint.

    `source` is a path or an already-loaded object: a raw state dict (the released DiT-XL-2-256x256.pt) or a
    train.py dict {"model", "ema", "opt", "args"}, from which `use` ("ema" or "model") is taken.
    Loads with weights_only=True and strict=True.
    """
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        source = torch.load(source, map_location="cpu", weights_only=True)
    state = source
    if "pos_embed" not in state and use in state:
        state = state[use]
    elif "pos_embed" not in state:
        raise ValueError(f"checkpoint has neither a state dict nor an {use!r} entry; keys: {list(state)[:8]}")
    state = _strip_prefixes(state)
    model = DiT(config_from_state_dict(state, num_heads))
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# diffusers out (and back)
# ---------------------------------------------------------------------------------------------------------------


def _block_map(i: int) -> dict[str, str]:
    """dit_core name -> diffusers name for block i (qkv is split separately)."""
    b, d = f"blocks.{i}", f"transformer_blocks.{i}"
    return {
        f"{b}.attn.proj": f"{d}.attn1.to_out.0",
        f"{b}.mlp.fc1": f"{d}.ff.net.0.proj",
        f"{b}.mlp.fc2": f"{d}.ff.net.2",
        f"{b}.adaLN_modulation.1": f"{d}.norm1.linear",
    }


def _shared_map(i: int) -> dict[str, str]:
    """Modules dit_core has once and diffusers has in every block i."""
    d = f"transformer_blocks.{i}.norm1.emb"
    return {
        "t_embedder.mlp.0": f"{d}.timestep_embedder.linear_1",
        "t_embedder.mlp.2": f"{d}.timestep_embedder.linear_2",
        "y_embedder.embedding_table": f"{d}.class_embedder.embedding_table",
    }


_TOP_MAP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def fix_timestep_shift(transformer: nn.Module) -> nn.Module:
    """Make a diffusers DiT use the official timestep frequencies (downscale_freq_shift = 0), in place."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def diffusers_config(config: DiTConfig) -> dict[str, Any]:
    """DiTTransformer2DModel constructor arguments equivalent to a DiTConfig."""
    if config.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT has mlp_ratio 4; this model has {config.mlp_ratio}")
    changed = {
        k: getattr(config, k)
        for k in ("positions", "mlp", "norm", "qk_norm")
        if getattr(config, k) != getattr(DiTOptions(), k)
    }
    if changed:
        raise ValueError(
            f"diffusers' DiTTransformer2DModel is the official block (sin-cos positions, GELU, LayerNorm, no "
            f"QK-norm); this model sets {changed}: keep it as a dit_core checkpoint"
        )
    return dict(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=config.input_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=config.num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
    )


def to_diffusers(model: nn.Module):
    """A diffusers DiTTransformer2DModel with the weights of `model`, timestep shift fixed (see module doc)."""
    from diffusers import DiTTransformer2DModel

    model = unwrap_model(model)
    config, D = model.config, model.config.hidden_size
    src = model.state_dict()
    dst: dict[str, torch.Tensor] = {}
    names = dict(_TOP_MAP)
    for i in range(config.depth):
        names.update(_block_map(i))
        # Each block gets its own copy of the embedders.
        for ours, theirs in _shared_map(i).items():
            for suffix in ("weight", "bias"):
                if f"{ours}.{suffix}" in src:
                    dst[f"{theirs}.{suffix}"] = src[f"{ours}.{suffix}"].clone()
        q, k, v = src[f"blocks.{i}.attn.qkv.weight"].split(D, dim=0)
        qb, kb, vb = src[f"blocks.{i}.attn.qkv.bias"].split(D, dim=0)
        d = f"transformer_blocks.{i}.attn1"
        dst.update({f"{d}.to_q.weight": q, f"{d}.to_k.weight": k, f"{d}.to_v.weight": v})
        dst.update({f"{d}.to_q.bias": qb, f"{d}.to_k.bias": kb, f"{d}.to_v.bias": vb})
    for ours, theirs in names.items():
        for suffix in ("weight", "bias"):
            dst[f"{theirs}.{suffix}"] = src[f"{ours}.{suffix}"]
    transformer = DiTTransformer2DModel(**diffusers_config(config))
    transformer.load_state_dict({k: v.contiguous() for k, v in dst.items()}, strict=True)
    return fix_timestep_shift(transformer.to(next(model.parameters()).device))


def from_diffusers(transformer: nn.Module) -> DiT:
    """A dit_core DiT from a diffusers DiTTransformer2DModel (embedders from block 0, as diffusers' output layer)."""
    cfg = transformer.config
    if cfg.norm_type != "ada_norm_zero":
        raise ValueError(f"only adaLN-Zero DiTs convert, this one has norm_type={cfg.norm_type!r}")
    in_channels, out_channels = cfg.in_channels, cfg.out_channels or cfg.in_channels
    config = DiTConfig(
        input_size=cfg.sample_size,
        patch_size=cfg.patch_size,
        in_channels=in_channels,
        hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
        depth=cfg.num_layers,
        num_heads=cfg.num_attention_heads,
        num_classes=cfg.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * in_channels,
    )
    src = transformer.state_dict()
    model = DiT(config)
    dst = {"pos_embed": model.pos_embed.detach().clone()}
    names = dict(_TOP_MAP)
    names.update(_shared_map(0))
    for i in range(config.depth):
        names.update(_block_map(i))
        d = f"transformer_blocks.{i}.attn1"
        for suffix in ("weight", "bias"):
            dst[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [src[f"{d}.to_q.{suffix}"], src[f"{d}.to_k.{suffix}"], src[f"{d}.to_v.{suffix}"]], dim=0
            )
    for ours, theirs in names.items():
        for suffix in ("weight", "bias"):
            if f"{theirs}.{suffix}" in src:
                dst[f"{ours}.{suffix}"] = src[f"{theirs}.{suffix}"]
    model.load_state_dict(dst, strict=True)
    return model


def load_diffusers_transformer(path_or_id: str, **kwargs):
    """DiTTransformer2DModel.from_pretrained(path_or_id) with the official timestep frequencies restored."""
    from diffusers import DiTTransformer2DModel

    return fix_timestep_shift(DiTTransformer2DModel.from_pretrained(path_or_id, **kwargs))


def export_diffusers_pipeline(
    model: nn.Module,
    out_dir: str | os.PathLike,
    vae,
    scheduler=None,
    id2label: dict[int, str] | None = None,
):
    """Save a diffusers DiTPipeline (transformer + VAE + scheduler) built from `model` with save_pretrained.

    The scheduler defaults to DPMSolverMultistepScheduler on the paper's linear betas. Note: DiTPipeline drops the
    learned variance and guides all latent channels. Load the transformer back with `load_diffusers_transformer` to
    keep the official timestep frequencies. DiTPipeline hard-codes the null class as label 1000, so its
    classifier-free guidance (guidance_scale > 1) needs a 1000-class model; without guidance any class count works.
    Returns the pipeline.
    """
    from diffusers import DiTPipeline

    from dit_core.samplers import diffusers_scheduler

    if scheduler is None:
        scheduler = diffusers_scheduler("DPMSolverMultistepScheduler")
    pipe = DiTPipeline(transformer=to_diffusers(model), vae=vae, scheduler=scheduler, id2label=id2label)
    if id2label is not None:  # stored in model_index.json, so from_pretrained gives it back
        pipe.register_to_config(id2label={str(k): v for k, v in id2label.items()})
    pipe.save_pretrained(out_dir)
    return pipe
