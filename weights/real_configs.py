"""The real configs of FLUX.1's components: facts of the public checkpoints, in one place.

weights/synthetic/components.py builds these on the meta device, for flux/fast/sizes.py to count bytes
(tests/test_memory_plan.py checks the parameter counts) and to write a synthetic weights folder.
"""

from __future__ import annotations

# diffusers FluxTransformer2DModel; every value here is also the library default, except guidance_embeds
TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
GUIDANCE_EMBEDS = {"dev": True, "schnell": False}
# transformers T5Config for google/t5-v1_1-xxl's encoder (the library defaults are t5-small's)
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
)
# transformers CLIPTextConfig for openai/clip-vit-large-patch14's text tower (defaults are ViT-B's)
CLIP_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)
# diffusers AutoencoderKL as in FLUX.1's vae/config.json
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024,
)
# CompVis/stable-diffusion-safety-checker: CLIP ViT-L/14 vision tower and a 768-wide projection
SAFETY_STAGE1_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224,
)
SAFETY_STAGE1_PROJECTION = 768
# Falconsai/nsfw_image_detection: ViT-base, two labels
SAFETY_STAGE2 = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
    image_size=224, num_labels=2,
)
