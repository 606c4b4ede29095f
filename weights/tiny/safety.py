"""Tiny safety models in the real Hugging Face repo layouts (for CPU tests).

`ensure_tiny_safety(root)` writes
- root/stable-diffusion-safety-checker: like CompVis/stable-diffusion-safety-checker (a CLIPConfig with
  vision_config and text_config, StableDiffusionSafetyChecker weights under their original key names, and the
  CLIP preprocessor_config.json), and
- root/nsfw_image_detection: like Falconsai/nsfw_image_detection (a ViTConfig with id2label
  {0: "normal", 1: "nsfw"}, ViTForImageClassification weights, the ViT preprocessor_config.json).

Random tiny vision transformers map every picture to nearly the same embedding, so their verdicts could not be
steered by what a picture shows. These weights are built by hand instead (deterministic, no seed needed): each
patch token carries the patch's mean "redness" R - (G+B)/2 and "greenness" G - (R+B)/2 next to a constant anchor,
attention averages the patches into the class token, and the heads compare those averages:
- stage 1 flags mostly red and mostly green pictures (concept 0 and concept 1);
- stage 2 calls mostly red pictures "nsfw" and everything else "normal".
So in tests red is flagged and confirmed, green is flagged and overturned, and blue, grey or noise pass stage 1.
Tests can steer further through the real knobs: stage 1's concept thresholds and stage 2's classifier head.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from weights.tiny.flux import default_tiny_root
from weights.tiny.repo_build import RepoBuild, write_json

BUILD = RepoBuild("tiny-safety", version="1")  # bump the version whenever the generated files change
FORMAT_VERSION, MARKER_FILE, STAGING_PREFIX = BUILD.version, BUILD.marker, BUILD.staging_prefix
STAGE_DIRS = {"stage1": "stable-diffusion-safety-checker", "stage2": "nsfw_image_detection"}

HIDDEN_SIZE = 32
PATCH_SIZE = 32  # 224 / 32 = 7x7 patches: the real 224 input size, but few tokens
IMAGE_SIZE = 224
# Weight of the constant anchor next to the colour features: a picture must be strongly coloured to matter.
ANCHOR = 0.5
# Stage 1 flags a concept when cos(embedding, concept) exceeds its threshold (here: the colour's share).
STAGE1_COLOUR_THRESHOLD = 0.5
# Thresholds no cosine can exceed, for the concept slots the tiny checker leaves unused.
UNREACHABLE_THRESHOLD = 2.0
# Stage 2 says "nsfw" when mean redness > STAGE2_REDNESS_RATIO * ANCHOR.
STAGE2_REDNESS_RATIO = 1.2
STAGE2_LOGIT_SCALE = 4.0

REDNESS = (1.0, -0.5, -0.5)  # R - (G+B)/2, as weights on mean R, G, B
GREENNESS = (-0.5, 1.0, -0.5)
NO_COLOUR = (0.0, 0.0, 0.0)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The two preprocessor configs as the real repos have them.
STAGE1_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "resample": 3,
    "size": 224,
}
STAGE2_PREPROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
STAGE2_LABELS = {0: "normal", 1: "nsfw"}


def ensure_tiny_safety(root: Path) -> dict[str, Path]:
    """Build both tiny safety repos under root unless complete current builds are there; return their paths."""
    root = Path(root)
    targets = {stage: root / name for stage, name in STAGE_DIRS.items()}
    BUILD.ensure(root, {targets["stage1"]: _write_stage1_repo, targets["stage2"]: _write_stage2_repo})
    return targets


def _write_stage1_repo(repo_dir: Path) -> None:
    from safetensors.torch import save_file

    model = tiny_stage1_model()
    repo_dir.mkdir(parents=True)
    model.config.save_pretrained(repo_dir)
    # The real checkpoint predates transformers 5 and nests the CLIP vision tower as vision_model.vision_model.
    state = {_legacy_stage1_key(key): tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, repo_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(repo_dir / "preprocessor_config.json", STAGE1_PREPROCESSOR)


def _legacy_stage1_key(key: str) -> str:
    return key.replace("vision_model.", "vision_model.vision_model.", 1) if key.startswith("vision_model.") else key


def _write_stage2_repo(repo_dir: Path) -> None:
    model = tiny_stage2_model()
    repo_dir.mkdir(parents=True)
    model.save_pretrained(repo_dir)  # transformers writes ViT under the original (pre-5) key names
    write_json(repo_dir / "preprocessor_config.json", STAGE2_PREPROCESSOR)


def tiny_stage1_model():
    """A StableDiffusionSafetyChecker whose concepts 0 and 1 are "mostly red" and "mostly green"."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        projection_dim=8,
        text_config=_tiny_encoder_shape() | {"vocab_size": 99, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config=_tiny_encoder_shape() | {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
    )
    config.architectures = ["StableDiffusionSafetyChecker"]
    model = StableDiffusionSafetyChecker(config).eval()
    # Hidden features: 0/1 = +-redness, 2/3 = +-greenness, 4/5 = +-anchor. Pairs keep each token zero-mean,
    # so the layer norms only rescale it and the ratios between features survive.
    features = [REDNESS, _negated(REDNESS), GREENNESS, _negated(GREENNESS), NO_COLOUR, NO_COLOUR]
    offsets = [0.0, 0.0, 0.0, 0.0, ANCHOR, -ANCHOR]
    tower = model.vision_model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        embeddings = tower.embeddings
        _set_patch_features(embeddings.patch_embedding.weight, features, CLIP_STD)
        # The patch conv has no bias, so the constant parts ride on the patch tokens' position embeddings.
        for dim, (colour, offset) in enumerate(zip(features, offsets, strict=True)):
            constant = offset + sum(weight * mean for weight, mean in zip(colour, CLIP_MEAN, strict=True))
            embeddings.position_embedding.weight[1:, dim] = constant
        layer = tower.encoder.layers[0]
        _make_class_token_average_patches(layer.self_attn.v_proj, layer.self_attn.out_proj)
        for norm in (tower.pre_layrnorm, layer.layer_norm1, layer.layer_norm2, tower.post_layernorm):
            norm.weight.fill_(1.0)
        # Embedding axes: 0 = redness, 1 = greenness, 2 = anchor.
        for axis, dim in enumerate((0, 2, 4)):
            model.visual_projection.weight[axis, dim] = 1.0
        model.concept_embeds[:, 2] = 1.0
        model.concept_embeds[0] = _unit_axis(0, 8)
        model.concept_embeds[1] = _unit_axis(1, 8)
        model.concept_embeds_weights.fill_(UNREACHABLE_THRESHOLD)
        model.concept_embeds_weights[:2] = STAGE1_COLOUR_THRESHOLD
        model.special_care_embeds[:, 2] = 1.0
        model.special_care_embeds_weights.fill_(UNREACHABLE_THRESHOLD)
    return model


def tiny_stage2_model():
    """A ViTForImageClassification that labels mostly red pictures "nsfw" and all others "normal"."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        **_tiny_encoder_shape(),
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        id2label=dict(STAGE2_LABELS),
        label2id={label: index for index, label in STAGE2_LABELS.items()},
    )
    config.architectures = ["ViTForImageClassification"]
    model = ViTForImageClassification(config).eval()
    # Hidden features: 0/1 = +-redness, 2/3 = +-anchor (zero-mean pairs, as in stage 1).
    features = [REDNESS, _negated(REDNESS), NO_COLOUR, NO_COLOUR]
    offsets = [0.0, 0.0, ANCHOR, -ANCHOR]
    # Falconsai normalises with mean 0.5 and std 0.5 on every channel.
    mean, std = STAGE2_PREPROCESSOR["image_mean"], STAGE2_PREPROCESSOR["image_std"]
    vit = model.vit
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        projection = vit.embeddings.patch_embeddings.projection
        _set_patch_features(projection.weight, features, std)
        for dim, (colour, offset) in enumerate(zip(features, offsets, strict=True)):
            projection.bias[dim] = offset + sum(weight * m for weight, m in zip(colour, mean, strict=True))
        layer = vit.layers[0]
        _make_class_token_average_patches(layer.attention.v_proj, layer.attention.o_proj)
        for norm in (layer.layernorm_before, layer.layernorm_after, vit.layernorm):
            norm.weight.fill_(1.0)
        # logit(nsfw) - logit(normal) = scale * (redness - ratio * anchor), both measured on the class token.
        model.classifier.weight[1, 0] = STAGE2_LOGIT_SCALE
        model.classifier.weight[1, 2] = -STAGE2_LOGIT_SCALE * STAGE2_REDNESS_RATIO
    return model


def _tiny_encoder_shape() -> dict[str, Any]:
    return {"hidden_size": HIDDEN_SIZE, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1}


def _set_patch_features(conv_weight, features: list[tuple[float, float, float]], pixel_std: list[float]) -> None:
    """Make output channel d the patch mean of features[d] . (R, G, B), undoing the processor's division by std.

    The processor feeds (pixel - mean) / std; the matching constant is added by the caller.
    """
    pixels_per_patch = conv_weight.shape[-1] * conv_weight.shape[-2]
    for dim, colour in enumerate(features):
        for channel, weight in enumerate(colour):
            conv_weight[dim, channel] = weight * pixel_std[channel] / pixels_per_patch


def _make_class_token_average_patches(value_proj, output_proj) -> None:
    """Zero queries and keys give uniform attention, so identity value/output maps add the token average.

    The class token itself is all zeros and stays zero through the layer norms, so it adds nothing.
    """
    import torch

    identity = torch.eye(HIDDEN_SIZE)
    value_proj.weight.copy_(identity)
    output_proj.weight.copy_(identity)


def _negated(colour: tuple[float, float, float]) -> tuple[float, float, float]:
    return (-colour[0], -colour[1], -colour[2])


def _unit_axis(axis: int, size: int):
    import torch

    vector = torch.zeros(size)
    vector[axis] = 1.0
    return vector


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else default_tiny_root()
    for stage, path in ensure_tiny_safety(root).items():
        print(f"{stage}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
