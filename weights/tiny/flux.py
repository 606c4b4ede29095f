"""Tiny, randomly initialised FLUX weights in the real diffusers repo layout (for CPU tests).

`ensure_tiny_flux(root)` writes root/FLUX.1-dev and root/FLUX.1-schnell, each laid out like the
black-forest-labs repos on the Hub (model_index.json plus one folder per pipeline component), so the
code under test loads them exactly as it loads the real weights. Only the sizes are tiny.

Weights are stored as fp32 holding values rounded to bf16. The real repos store bf16, but with these
versions a plain `FluxPipeline.from_pretrained(dir)` then loads the diffusers parts as fp32 and the
transformers parts as bf16 and fails on the mix; fp32 files load in one dtype, and CPU runs fp32 faster.
The bf16 rounding makes loading with torch_dtype bf16 or fp32 give exactly the same numbers.

Everything is a pure function of fixed seeds and the built-in corpus: two builds are byte-identical.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import settings
from weights.tiny.repo_build import RepoBuild, write_json
from weights.tiny.tokenizers import CLIP_MAX_LENGTH, write_clip_tokenizer, write_t5_tokenizer

BUILD = RepoBuild("tiny-flux", version="2")  # bump the version whenever the generated files change
FORMAT_VERSION, MARKER_FILE, PARTIAL_PREFIX = BUILD.version, BUILD.marker, BUILD.staging_prefix

VARIANT_DIRS = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}
TRANSFORMER_SEEDS = {"dev": 0, "schnell": 1}
CLIP_SEED, T5_SEED, VAE_SEED = 10, 11, 12
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")

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

# FLUX's VAE with tiny widths: 4 blocks keep the 8x downscale; FLUX's scaling and shift factors.
# The mid-block attention is off because at 1024x1024 it attends over 16k positions, which alone
# would take longer on CPU than the whole rest of the pipeline.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)

# scheduler/scheduler_config.json of the real repos: dev shifts the schedule by image size, schnell does not.
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    ),
    "schnell": dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
    ),
}

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

def default_tiny_root() -> Path:
    """Where the tiny weights live unless a caller says otherwise (the .cache folder is git-ignored)."""
    configured = settings.text("FLUX_TINY_WEIGHTS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny-weights"


def ensure_tiny_flux(root: Path) -> dict[str, Path]:
    """Build the tiny dev and schnell repos under root unless a complete current build is there."""
    root = Path(root)
    targets = {variant: root / name for variant, name in VARIANT_DIRS.items()}
    BUILD.ensure(
        root,
        {
            targets["dev"]: lambda repo_dir: _write_repo(repo_dir, "dev"),
            targets["schnell"]: lambda repo_dir: _write_repo(repo_dir, "schnell", shared_from=targets["dev"]),
        },
    )
    return targets


def _write_repo(repo_dir: Path, variant: str, shared_from: Path | None = None) -> None:
    """Write one complete repo (RepoBuild adds the completion marker)."""
    repo_dir.mkdir(parents=True)
    write_json(repo_dir / "model_index.json", MODEL_INDEX)
    _write_scheduler(repo_dir / "scheduler", variant)
    _save_model(tiny_transformer(variant == "dev", TRANSFORMER_SEEDS[variant]), repo_dir / "transformer")
    if shared_from is not None:
        for component in SHARED_COMPONENTS:
            shutil.copytree(shared_from / component, repo_dir / component)
    else:
        clip_vocab_size = write_clip_tokenizer(repo_dir / "tokenizer")
        t5_vocab_size = write_t5_tokenizer(repo_dir / "tokenizer_2")
        _save_model(_tiny_clip_text_model(clip_vocab_size), repo_dir / "text_encoder")
        _save_model(_tiny_t5_encoder(t5_vocab_size), repo_dir / "text_encoder_2")
        _save_model(_tiny_vae(), repo_dir / "vae")


def tiny_transformer(guidance_embeds: bool, seed: int = 0):
    """A tiny FluxTransformer2DModel (dev: guidance_embeds=True, schnell: False), deterministic from seed."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=guidance_embeds)


def _tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(VAE_SEED)
    return AutoencoderKL(**VAE_CONFIG)


def _tiny_clip_text_model(vocab_size: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    # The pooled output feeds the transformer's pooled projection, so the widths must agree.
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TRANSFORMER_CONFIG["pooled_projection_dim"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TRANSFORMER_CONFIG["pooled_projection_dim"],
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(CLIP_SEED)
    return CLIPTextModel(config)


def _tiny_t5_encoder(vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 shape (gated GELU, untied embeddings), with d_model = the transformer's text width.
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TRANSFORMER_CONFIG["joint_attention_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(T5_SEED)
    return T5EncoderModel(config)


def _save_model(model: Any, directory: Path) -> None:
    # Round to bf16 and store as fp32 (see the module docstring). .bfloat16()/.float() rather than .to(dtype),
    # which in diffusers warns about fp32-pinned modules (FLUX has none).
    model.bfloat16().float().save_pretrained(directory, safe_serialization=True)


def _write_scheduler(directory: Path, variant: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]).save_pretrained(directory)


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else default_tiny_root()
    for variant, path in ensure_tiny_flux(root).items():
        print(f"{variant}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
