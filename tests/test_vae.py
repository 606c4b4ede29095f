"""How the shared VAE decodes (flux/vae.py): slicing decodes each image of a batch exactly as if it were alone,
and tiling stays within a documented PSNR of the untiled decode."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from flux.vae import configure_vae, tiling_pays
from weights.real_configs import VAE


def _pixels(decoded: torch.Tensor) -> torch.Tensor:
    """The 8-bit pixels the pipeline saves (output_type="pil" rounds the same way)."""
    return (VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="pt") * 255).round().to(torch.uint8)


def _decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(latents).sample


@pytest.fixture(scope="module")
def tiny_vae(tiny_weights):
    return AutoencoderKL.from_pretrained(tiny_weights.dev / "vae").eval()


@pytest.fixture(scope="module")
def real_width_vae():
    torch.manual_seed(0)
    return AutoencoderKL(**VAE).eval()  # FLUX.1's VAE config, random weights


@pytest.mark.parametrize("which, latent_side", [("tiny", 128), ("tiny", 32), ("real_width", 16)])
def test_a_sliced_batch_decodes_each_image_exactly_as_alone(request, which, latent_side):
    vae = request.getfixturevalue(f"{which}_vae")
    latents = torch.randn(3, vae.config.latent_channels, latent_side, latent_side, generator=torch.Generator().manual_seed(1))
    vae.disable_slicing()
    alone = torch.cat([_decode(vae, latent[None]) for latent in latents])
    configure_vae(vae, tiling=False)
    try:
        assert torch.equal(_decode(vae, latents), alone)
    finally:
        vae.disable_slicing()


def test_sliced_pixels_equal_the_whole_batch_decode_at_1024(tiny_vae):
    latents = torch.randn(4, 4, 128, 128, generator=torch.Generator().manual_seed(2))  # 1024x1024 x 4
    whole = _pixels(_decode(tiny_vae, latents))
    configure_vae(tiny_vae, tiling=False)
    try:
        assert torch.equal(_pixels(_decode(tiny_vae, latents)), whole)
    finally:
        tiny_vae.disable_slicing()


def test_where_the_batched_kernel_rounds_differently_pixels_differ_by_one_level_at_most(real_width_vae):
    # on CPU oneDNN picks its convolution by batch size at some shapes, so the whole-batch decode itself carries
    # float noise (the same noise DESIGN notes for a batch against num_outputs=1); slicing removes it
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    whole = _pixels(_decode(real_width_vae, latents)).int()
    configure_vae(real_width_vae, tiling=False)
    try:
        sliced = _pixels(_decode(real_width_vae, latents)).int()
    finally:
        real_width_vae.disable_slicing()
    assert (whole - sliced).abs().max() <= 1
    assert (whole != sliced).float().mean() < 0.001


def _psnr(decoded: torch.Tensor, reference: torch.Tensor) -> float:
    mse = ((decoded.clamp(-1, 1) - reference.clamp(-1, 1)) ** 2).mean()
    return float(10 * torch.log10(4 / mse))  # the range is [-1, 1]


def test_tiling_stays_within_its_psnr_bound(tiny_vae):
    # 720x720 in tiles of 512: the tile layout of 1440x1440 in flux/vae.py's 1024 tiles (2x2, a quarter overlap)
    latents = torch.randn(1, 4, 90, 90, generator=torch.Generator().manual_seed(4))
    untiled = _decode(tiny_vae, latents)
    configure_vae(tiny_vae, tiling=True, tile_px=512)
    try:
        tiled = _decode(tiny_vae, latents)
        small = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(5))
        assert torch.equal(_decode(tiny_vae, small), _decode_untiled(tiny_vae, small))  # 512 px: not tiled
    finally:
        configure_vae(tiny_vae, tiling=False)
        tiny_vae.disable_slicing()
    assert not torch.equal(tiled, untiled)
    assert _psnr(tiled, untiled) > 35


def test_tiling_pays_only_below_one_untiled_1440_decode():
    gib = 2**30
    assert tiling_pays(2 * gib) and not tiling_pays(4 * gib)
    assert not tiling_pays(int(8.87 * gib))  # the least room a memory plan keeps: T5's, when it waits on the host


def _decode_untiled(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    vae.disable_tiling()
    try:
        return _decode(vae, latents)
    finally:
        vae.enable_tiling()
