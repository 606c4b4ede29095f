"""How the shared VAE decodes a batch: one image at a time, and in tiles only where memory is short.

Slicing (diffusers' `enable_slicing`) runs the decoder on each image of the batch in turn: the same convolutions
on the same latents, so the pixels are identical to a whole-batch decode (tests/test_vae.py), and the peak is one
image's activations instead of the batch's. Measured at FLUX.1's real widths (script/vae_memory), a batch of 4
decodes in about 0.3 of the whole-batch peak; slicing costs nothing on a GPU, whose kernels are already full at
one image of 1 MP.

Tiling (`enable_tiling`) decodes overlapping tiles and blends their seams. It halves one 1440x1440 image's peak
again (its largest tile is 1024x1024), but it changes pixels slightly (PSNR above 40 dB against the untiled
decode on the test VAEs, tests/test_vae.py) and costs compute: diffusers' tiles overlap by a quarter, so a
1440x1440 decode runs 212² latent pixels instead of 180² (1.39x). It pays only where the activation reserve
cannot hold one untiled image: the memory plan says where (flux/fast/memory.py, `MemoryPlan.vae_tiling`).
"""

from __future__ import annotations

TILE_PX = 1024  # diffusers' tile for FLUX.1's VAE (its sample_size); images with a side above it are tiled


def configure_vae(vae, *, tiling: bool, tile_px: int = TILE_PX) -> None:
    """Slice every batch; tile images with a side above tile_px when `tiling` (AutoencoderKL)."""
    vae.enable_slicing()
    if not tiling:
        vae.disable_tiling()
        return
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for FLUX.1's four blocks
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // downscale
    vae.enable_tiling()
