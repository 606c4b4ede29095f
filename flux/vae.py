"""How the shared VAE decodes a batch: one image at a time, and in tiles only where memory is short.

Slicing (diffusers' `enable_slicing`) runs the decoder on each image of the batch in turn, so the peak is one
image's activations instead of the batch's. Measured at FLUX.1's real widths (bench/vae_memory, CPU, fp32, 4
images): 0.34 of the whole-batch peak at 512x512, 0.31 at 720x720, and 0.30 at 1440x1440 by the linear fit
(7.0 GiB against 23.2; in bf16 about 3.4 against 11.6). Each image is decoded bit for bit as if it were alone
(tests/test_vae.py), so an image of a batch no longer depends on its batch-mates; the whole-batch decode itself
carries float noise where the batched convolution rounds differently (on CPU at most one 8-bit level in under
0.1% of values at some sizes; identical at 1024x1024 on the tiny VAE).

Tiling (`enable_tiling`) decodes overlapping tiles and blends their seams: at 1440x1440 with 1024 px tiles the
peak halves again (0.15 of whole), but the compute grows by 1.39x (212² latent pixels decoded instead of 180²,
as tiles overlap by a quarter) and the pixels change: PSNR 38-41 dB against the untiled decode on the tiny VAE,
unknown on the trained one (a random-weight real-width VAE, whose mid-block attention is global, gives 18 dB,
which says nothing about trained weights). So it is used only where the room kept for activations cannot hold
one untiled image of the largest size, which no memory plan with the default reserve does.
"""

from __future__ import annotations

TILE_PX = 1024  # diffusers' tile for FLUX.1's VAE (its sample_size): images with a side above it are tiled
# one 1440x1440 image decoded untiled, in bf16: half the 7.0 GiB measured in fp32 for a sliced batch (above)
UNTILED_DECODE_PEAK = int(3.5 * 2**30)


def tiling_pays(activation_bytes: int) -> bool:
    """Whether GPU room of activation_bytes (the memory plan's `activations`) is too small for one untiled
    1440x1440 decode."""
    return activation_bytes < UNTILED_DECODE_PEAK


def configure_vae(vae, *, tiling: bool, tile_px: int = TILE_PX) -> None:
    """Slice every batch; when `tiling`, also tile images with a side above tile_px (diffusers AutoencoderKL)."""
    vae.enable_slicing()
    if not tiling:
        vae.disable_tiling()
        return
    downscale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for FLUX.1's four blocks
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // downscale
    vae.enable_tiling()
