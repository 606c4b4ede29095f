"""torch.compile for the FLUX transformer: one graph for every image size, LoRA switches without recompiling.

- **Dynamic token count.** Before every call the token dimension of `hidden_states` (batch, tokens, channels)
  and `img_ids` (tokens, 3) is marked dynamic, so the first compile already covers every aspect ratio and both
  megapixel settings. The text length is fixed per model (512 dev, 256 schnell). The batch size is left to
  torch's automatic dynamic shapes: the first call with more than one image compiles once more, with the batch
  dynamic, and that graph then serves 2, 3 and 4 images. `warm_up` makes both compiles happen at setup.
- **forward is compiled, not the module.** The module object stays the same, so pipelines, from_pipe views
  and the LoRA fusers keep referring to it, and the marking above runs eagerly, outside the compiled code.
- **LoRAs.** Both fusers (lora/apply.py, flux/fast/lora_fp8.py) write fused values into the existing weight
  tensors in place. Dynamo's guards look at a parameter's type, shape, dtype and device, never its values, so a
  LoRA switch reuses the compiled graph (tests/test_compile.py counts compilations to prove it).
- **Attention.** On Hopper (capability 9.x) cuDNN's fused attention is preferred, a preference, not a
  restriction: shapes cuDNN cannot serve fall back to flash, then memory-efficient, then math. Elsewhere
  PyTorch's own order (flash first) is kept. The priority is active while the graph is traced, which is when
  the kernel is chosen.

Compiling happens only on CUDA (inductor's CPU code would take minutes to build here and gain little); set
FLUX_COMPILE=0 to run eagerly. The warm-up runs one denoising step per size at setup so no request pays for a
compile; FLUX_COMPILE_WARMUP=0 skips it (the first request of each new shape then compiles).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import settings
from flux.sizes import MEGAPIXELS, SIZES_1MP, output_size

log = logging.getLogger(__name__)

# cuDNN first on Hopper: 1.7-2.3x faster than flash there at the same accuracy; slower on Ampere and Blackwell
HOPPER_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
WARM_UP_BATCH_SIZES = (1, 2)  # 1 compiles the token-dynamic graph, 2 the batch-dynamic one (used for 2..4)
# Dynamo keeps its graphs per code object, and every transformer's forward is the same function, so all
# compiled variants (2 graphs each) count against one limit. At the default 8, four variants fill it and any
# further compile would silently run eagerly (the tests hit this). Far above what we compile, far below
# runaway recompiling.
RECOMPILE_LIMIT = 64


def attention_priority(device: torch.device, capability: tuple[int, int] | None = None) -> list[SDPBackend] | None:
    """The SDPA backends in order of preference for this device, or None to keep PyTorch's default order."""
    if device.type != "cuda":
        return None
    major, _ = capability or torch.cuda.get_device_capability(device)
    return HOPPER_ATTENTION if major == 9 else None


def compile_wanted(device: torch.device) -> bool:
    """Compile on CUDA unless FLUX_COMPILE=0."""
    return device.type == "cuda" and settings.flag("FLUX_COMPILE")


def is_compiled(transformer: nn.Module) -> bool:
    return "forward" in vars(transformer)


def compile_transformer(
    transformer: nn.Module,
    *,
    backend: object = "inductor",
    fullgraph: bool = False,
    attention: Sequence[SDPBackend] | None = None,
) -> None:
    """Compile `transformer.forward` in place, with a dynamic token dimension (see the module docstring).

    backend: "inductor" on GPU; tests pass a counting backend. fullgraph=True makes a graph break an error
    (the tests use it to show there is none); at setup a break only costs speed, so it is allowed.
    attention: SDPA backends in order of preference while compiling and running (None: PyTorch's order)."""
    if is_compiled(transformer):
        return
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(transformer.forward, backend=backend, fullgraph=fullgraph)
    priority = list(attention) if attention else None

    @functools.wraps(transformer.forward)  # the bound method: its signature, without self
    def forward(*args, **kwargs):
        _mark_tokens_dynamic(args, kwargs)
        with sdpa_kernel(priority, set_priority=True) if priority else contextlib.nullcontext():
            return compiled(*args, **kwargs)

    transformer.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's


def uncompile_transformer(transformer: nn.Module) -> None:
    """Back to eager forward (after a compile that failed during warm-up, for instance)."""
    vars(transformer).pop("forward", None)


def _mark_tokens_dynamic(args: tuple, kwargs: dict) -> None:
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    img_ids = kwargs.get("img_ids")
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 3:
        torch._dynamo.mark_dynamic(hidden_states, 1)
    if isinstance(img_ids, torch.Tensor) and img_ids.dim() == 2:
        torch._dynamo.mark_dynamic(img_ids, 0)


def warm_up_sizes() -> list[tuple[int, int]]:
    """(width, height) of every aspect ratio at 1 MP and 0.25 MP, as requests ask for them."""
    return list(dict.fromkeys(output_size(ratio, megapixels) for megapixels in MEGAPIXELS for ratio in SIZES_1MP))


def warm_up(
    pipeline,
    sizes: Iterable[tuple[int, int]],
    *,
    max_sequence_length: int,
    batch_sizes: Sequence[int] = WARM_UP_BATCH_SIZES,
    exclusive: contextlib.AbstractContextManager | None = None,
) -> float:
    """One denoising step at each size (and each batch size at the first size) through the real pipeline call,
    so that every compile happens now and not in a user's request. Returns the seconds taken.

    The call matches FluxGenerator's: txt2img, under inference_mode, guidance only when the transformer has a
    guidance embedding. Dynamo guards on such details, so a different call would compile again later.

    exclusive: held around each call (the pipelines' PIPELINE_CALLS lock): a background warm-up shares the
    scheduler, tokenizers and text encoders with the requests being served, so its calls take turns with theirs."""
    exclusive = exclusive or contextlib.nullcontext()
    started = time.perf_counter()
    sizes = list(sizes)
    guidance = {"guidance_scale": 3.5} if pipeline.transformer.config.guidance_embeds else {}
    with torch.inference_mode(), exclusive:
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt="warm-up", prompt_2=None, max_sequence_length=max_sequence_length
        )
    runs = [(width, height, 1) for width, height in sizes]
    runs += [(*sizes[0], batch) for batch in batch_sizes if batch != 1] if sizes else []
    for width, height, batch in runs:
        size_started = time.perf_counter()
        with torch.inference_mode(), exclusive:
            pipeline(
                prompt_embeds=prompt_embeds.repeat(batch, 1, 1),
                pooled_prompt_embeds=pooled_prompt_embeds.repeat(batch, 1),
                width=width,
                height=height,
                num_inference_steps=1,
                max_sequence_length=max_sequence_length,
                generator=[torch.Generator(pipeline.device).manual_seed(i) for i in range(batch)],
                output_type="latent",
                **guidance,
            )
        log.debug("warm-up %dx%d x%d: %.2fs", width, height, batch, time.perf_counter() - size_started)
    return time.perf_counter() - started


def compile_for_serving(
    pipeline, *, max_sequence_length: int, label: str, exclusive: contextlib.AbstractContextManager | None = None
) -> bool:
    """At setup, for one txt2img pipeline on CUDA: compile its transformer and warm it up at every request
    size. Does nothing on CPU or with FLUX_COMPILE=0. If the warm-up fails, the transformer runs eagerly
    (logged) rather than failing setup. Returns whether the transformer is now compiled."""
    transformer = pipeline.transformer
    device = transformer.device
    if not compile_wanted(device):
        return False
    priority = attention_priority(device)
    compile_transformer(transformer, attention=priority)
    attention = "cuDNN preferred" if priority else "PyTorch's default order"
    if not settings.flag("FLUX_COMPILE_WARMUP"):
        log.info("%s: compiled lazily (FLUX_COMPILE_WARMUP=0: each new shape compiles on first use); attention: %s",
                 label, attention)
        return True
    sizes = warm_up_sizes()
    try:
        seconds = warm_up(pipeline, sizes, max_sequence_length=max_sequence_length, exclusive=exclusive)
    except Exception:
        uncompile_transformer(transformer)
        log.exception("%s: torch.compile failed during warm-up; running without compile", label)
        return False
    log.info("%s: compiled and warmed up at %d sizes in %.1fs; attention: %s", label, len(sizes), seconds, attention)
    return True
