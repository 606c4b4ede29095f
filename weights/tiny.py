"""Tiny, randomly initialised FLUX weights in the real diffusers repo layout (for CPU tests)."""

from __future__ import annotations

# Shapes of the tiny transformer. in_channels = VAE latent_channels (4) x 2x2 packing.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)


def tiny_transformer(guidance_embeds: bool, seed: int = 0):
    """A tiny FluxTransformer2DModel (dev: guidance_embeds=True, schnell: False), deterministic from seed."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=guidance_embeds)
