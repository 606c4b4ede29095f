"""The Cog layer: the input schemas of the Replicate FLUX LoRA pages, one runner class per schema variant.

- Predictor: the trained-FLUX-LoRA page (go_fast off by default). cog.yaml names it.
- FastPredictor: the same page with go_fast on by default.
- LegacyPredictor: the older flux-fine-tuner page (no image, mask, go_fast, megapixels or extra LoRA).
- MultiLoraPredictor: the trained-LoRA page with any number of extra LoRAs (extra_loras, extra_lora_scales: lists)
  in place of the one extra_lora; no hosted page has it, so its schema is ours (.cog/schemas/MultiLoraPredictor.json).
Point cog.yaml's `run:` at the one you deploy, then run script/schema. These use cog's names since 0.20 (BaseRunner,
run()); the file and the class names stay, so `cog predict` and existing references keep working.

Defaults, bounds and descriptions are literals in each signature because cog reads this file statically (so the
variants repeat them); flux/request.py holds the same bounds (`limits` below, so that an in-process call keeps to the
schema of the class called) and tests/test_schema.py checks every variant against it. Behaviour lives in flux/.
"""

import logging
import sys
import time
from typing import List, Optional

from cog import BaseRunner, Input, Path

from flux.request import LEGACY_LIMITS, LIMITS, build_request


class Predictor(BaseRunner):
    limits = LIMITS
    go_fast_default = False  # the signature's go_fast default (a test checks they agree): decides the resident variants
    has_go_fast = True  # whether the signature has a go_fast input (the GPU memory plan counts fp8 only if so)

    def setup(self, weights: Optional[str] = None) -> None:
        started = time.perf_counter()
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        from weights.libraries import prepare_libraries

        prepare_libraries()  # before diffusers and transformers load: no import noise in the logs
        from flux.generate import FluxGenerator  # here, so that reading the schema (script/schema) loads no torch

        logging.getLogger(__name__).info("Imports took %.2fs", time.perf_counter() - started)
        self.generator = FluxGenerator.for_deployment(weights, go_fast_default=self.go_fast_default, has_go_fast=self.has_go_fast)
        logging.getLogger(__name__).info("Setup took %.2fs", time.perf_counter() - started)

    def run(
        self,
        prompt: str = Input(description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."),
        image: Optional[Path] = Input(
            description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            default="1:1",
        ),
        height: Optional[int] = Input(
            description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        width: Optional[int] = Input(
            description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
            ge=0.0,
            le=1.0,
            default=0.8,
        ),
        model: str = Input(
            description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.",
            choices=["dev", "schnell"],
            default="dev",
        ),
        num_outputs: int = Input(description="Number of outputs to generate", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Number of denoising steps. More steps can give more detailed images, but take longer.",
            ge=1,
            le=50,
            default=28,
        ),
        guidance_scale: float = Input(
            description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5",
            ge=0,
            le=10,
            default=3,
        ),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation", default=None),
        output_format: str = Input(
            description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=80,
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        go_fast: bool = Input(
            description="Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16",
            default=False,
        ),
        megapixels: str = Input(
            description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"
        ),
        replicate_weights: Optional[str] = Input(
            description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet.",
            default=None,
        ),
        lora_scale: float = Input(description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.", ge=-1, le=3, default=1),
        extra_lora: Optional[str] = Input(description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'", default=None),
        extra_lora_scale: float = Input(description="Determines how strongly the extra LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.", ge=-1, le=3, default=1),
    ) -> List[Path]:
        return self.generate(**locals_without_self(locals()))

    def generate(self, **inputs: object) -> List[Path]:
        """Every variant ends here: validate into a request (defaults for inputs it lacks) and run it."""
        request = build_request(**inputs, limits=self.limits)
        return [Path(p) for p in self.generator.run(request)]


class FastPredictor(Predictor):
    """The trained-LoRA page as deployed with go_fast on by default."""

    go_fast_default = True

    def run(
        self,
        prompt: str = Input(description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."),
        image: Optional[Path] = Input(
            description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.",
            default=None,
        ),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            default="1:1",
        ),
        height: Optional[int] = Input(
            description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        width: Optional[int] = Input(
            description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation",
            ge=256,
            le=1440,
            default=None,
        ),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image",
            ge=0.0,
            le=1.0,
            default=0.8,
        ),
        model: str = Input(
            description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.",
            choices=["dev", "schnell"],
            default="dev",
        ),
        num_outputs: int = Input(description="Number of outputs to generate", ge=1, le=4, default=1),
        num_inference_steps: int = Input(
            description="Number of denoising steps. More steps can give more detailed images, but take longer.",
            ge=1,
            le=50,
            default=28,
        ),
        guidance_scale: float = Input(
            description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5",
            ge=0,
            le=10,
            default=3,
        ),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation", default=None),
        output_format: str = Input(
            description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=80,
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        go_fast: bool = Input(
            description="Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16",
            default=True,
        ),
        megapixels: str = Input(
            description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"
        ),
        replicate_weights: Optional[str] = Input(
            description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet.",
            default=None,
        ),
        lora_scale: float = Input(description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.", ge=-1, le=3, default=1),
        extra_lora: Optional[str] = Input(description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, 'fofr/flux-pixar-cars'", default=None),
        extra_lora_scale: float = Input(description="Determines how strongly the extra LoRA should be applied. Sane results between 0 and 1 for base inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance when scaling the base value by that amount. You may still need to experiment to find the best value for your particular lora.", ge=-1, le=3, default=1),
    ) -> List[Path]:
        return self.generate(**locals_without_self(locals()))


class LegacyPredictor(Predictor):
    """The older flux-fine-tuner page (replicate_weights is its hidden x-order 12)."""

    limits = LEGACY_LIMITS  # lora_scale up to 2
    has_go_fast = False

    def run(
        self,
        prompt: str = Input(description="Prompt for generated image"),
        aspect_ratio: str = Input(
            description="Aspect ratio for the generated image. The size will always be 1 megapixel, i.e. 1024x1024 if aspect ratio is 1:1. To use arbitrary width and height, set aspect ratio to 'custom'.",
            choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"],
            default="1:1",
        ),
        width: Optional[int] = Input(
            description="Width of the generated image. Optional, only used when aspect_ratio=custom. Must be a multiple of 16 (if it's not, it will be rounded to nearest multiple of 16)",
            ge=256,
            le=1440,
            default=None,
        ),
        height: Optional[int] = Input(
            description="Height of the generated image. Optional, only used when aspect_ratio=custom. Must be a multiple of 16 (if it's not, it will be rounded to nearest multiple of 16)",
            ge=256,
            le=1440,
            default=None,
        ),
        num_outputs: int = Input(description="Number of images to output.", ge=1, le=4, default=1),
        lora_scale: float = Input(
            description="Determines how strongly the LoRA should be applied. Sane results between 0 and 1.",
            ge=-1,
            le=2,
            default=1,
        ),
        num_inference_steps: int = Input(description="Number of inference steps", ge=1, le=50, default=28),
        model: str = Input(
            description="Which model to run inferences with. The dev model needs around 28 steps but the schnell model only needs around 4 steps.",
            choices=["dev", "schnell"],
            default="dev",
        ),
        guidance_scale: float = Input(description="Guidance scale for the diffusion process", ge=0, le=10, default=3.5),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation", default=None),
        output_format: str = Input(
            description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs",
            ge=0,
            le=100,
            default=80,
        ),
        replicate_weights: Optional[str] = Input(
            description="Replicate LoRA weights to use. Leave blank to use the default weights.",
            default=None,
        ),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
    ) -> List[Path]:
        return self.generate(**locals_without_self(locals()))


class MultiLoraPredictor(Predictor):
    """The trained-LoRA page with up to 8 extra LoRAs, each with its own scale (rules: flux/request.py)."""

    def run(
        self,
        prompt: str = Input(description="Prompt for generated image. If you include the `trigger_word` used in the training process you are more likely to activate the trained object, style, or concept in the resulting image."),
        image: Optional[Path] = Input(description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.", default=None),
        mask: Optional[Path] = Input(description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height inputs are ignored.", default=None),
        aspect_ratio: str = Input(description="Aspect ratio for the generated image. If custom is selected, uses height and width below & will run in bf16 mode", choices=["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21", "custom"], default="1:1"),
        height: Optional[int] = Input(description="Height of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation", ge=256, le=1440, default=None),
        width: Optional[int] = Input(description="Width of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest multiple of 16. Incompatible with fast generation", ge=256, le=1440, default=None),
        prompt_strength: float = Input(description="Prompt strength when using img2img. 1.0 corresponds to full destruction of information in image", ge=0.0, le=1.0, default=0.8),
        model: str = Input(description="Which model to run inference with. The dev model performs best with around 28 inference steps but the schnell model only needs 4 steps.", choices=["dev", "schnell"], default="dev"),
        num_outputs: int = Input(description="Number of outputs to generate", ge=1, le=4, default=1),
        num_inference_steps: int = Input(description="Number of denoising steps. More steps can give more detailed images, but take longer.", ge=1, le=50, default=28),
        guidance_scale: float = Input(description="Guidance scale for the diffusion process. Lower values can give more realistic images. Good values to try are 2, 2.5, 3 and 3.5", ge=0, le=10, default=3),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation", default=None),
        output_format: str = Input(description="Format of the output images", choices=["webp", "jpg", "png"], default="webp"),
        output_quality: int = Input(description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest quality. Not relevant for .png outputs", ge=0, le=100, default=80),
        disable_safety_checker: bool = Input(description="Disable safety checker for generated images.", default=False),
        go_fast: bool = Input(description="Run faster predictions with model optimized for speed (currently fp8 quantized); disable to run in original bf16", default=False),
        megapixels: str = Input(description="Approximate number of megapixels for generated image", choices=["1", "0.25"], default="1"),
        replicate_weights: Optional[str] = Input(description="Load LoRA weights. Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet.", default=None),
        lora_scale: float = Input(description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1 for base inference. You may still need to experiment to find the best value for your particular lora.", ge=-1, le=3, default=1),
        extra_loras: Optional[List[str]] = Input(description="Extra LoRAs to apply with the main one, up to 8, each listed once. Each entry takes the forms of replicate_weights: <owner>/<username>[/<version>], huggingface.co/<owner>/<model-name>, civitai.com/models/<id>[/<model-name>], or a .safetensors URL. For example ['fofr/flux-pixar-cars', 'huggingface.co/alvdansen/softserve_anime']", default=None),
        extra_lora_scales: Optional[List[float]] = Input(description="How strongly each LoRA of extra_loras is applied: one scale per LoRA, in the same order, each from -1 to 3 (sane results between 0 and 1). Leave empty to apply every extra LoRA at 1.", ge=-1, le=3, default=None),
    ) -> List[Path]:
        return self.generate(**locals_without_self(locals()))


def locals_without_self(names: dict) -> dict:
    return {name: value for name, value in names.items() if name not in ("self", "__class__")}

