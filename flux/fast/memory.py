"""The GPU memory plan: what each component of the real FLUX.1 weighs, and which variants fit on one GPU.

Sizes are counted, not guessed: `real_sizes()` builds the real-size transformer, T5, CLIP, VAE and both safety
models on the `meta` device (no weights, no memory) from the configs below and adds up their parameters and
buffers in the dtype each runs in. fp8 counts what flux/fast/quantize.py makes of a transformer: 1 byte per
weight of the Linear layers it quantises (those inside the double and single blocks) plus one float32 scale
per output row; everything else stays bf16.

`plan_memory()` is the decision, pure arithmetic on those sizes:
- the shared components (text encoders, VAE, safety checker) are always on the GPU, once for all variants;
- `reserve` stays free for activations (denoising, and the VAE decoding 4 images at 1 MP);
- the wanted variants, in the order given, are resident while they fit;
- every other variant has to fit, one at a time, in a `slot` kept free beside them: it is either kept in
  pinned host memory and copied in when asked for (swapped, about a second for a bf16 transformer over PCIe
  gen5), or built from the checkpoint when asked for (lazy). Swapped needs `host_budget`; lazy needs nothing.
  If the slot does not fit, the last resident variant gives up its place, and so on.
- setup never holds two full bf16 copies of one transformer: a bf16 variant is loaded once, to one place, and
  an fp8 variant is built from the checkpoint tensor by tensor, never from a bf16 copy in memory
  (`load_fp8_transformer`). The plan lists the setup steps with the copies alive after each, and says so.

Units are bytes; tables print GiB (GPU memory is sized in binary units: an "80 GB" H100 has 80 GiB, of which
torch reports 79.6 GiB; the default budget for planning without a GPU is 79 GiB).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import settings
from flux.variants import MODELS, Variant, default_resident
from weights.real_configs import (  # the real configs: built on meta here to count bytes
    CLIP_TEXT,
    GUIDANCE_EMBEDS,
    SAFETY_STAGE1_PROJECTION,
    SAFETY_STAGE1_VISION,
    SAFETY_STAGE2,
    T5_XXL,
    TRANSFORMER,
    VAE,
)

log = logging.getLogger(__name__)

GIB = 1024**3
BUDGET_WITHOUT_GPU = 79 * GIB  # one 80 GB H100 (79.6 GiB visible to torch), less room for the CUDA context

# bytes per element of each component as safety/checker.py and flux/pipelines.py load them on CUDA
BF16, FP16, FP32 = 2, 2, 4


# --- counting ----------------------------------------------------------------------------------------------

def module_bytes(module, bytes_per_element: int, *, fp8: Callable[[str, object], bool] | None = None,
                 per_row_scales: bool = True) -> int:
    """Bytes of a module's parameters and buffers with floating tensors at `bytes_per_element` (others as they
    are). fp8(name, submodule) says which Linear weights are stored as fp8: 1 byte each, plus float32 scales
    (one per output row, or one per tensor)."""
    quantised = {f"{name}.weight": sub for name, sub in module.named_modules() if fp8 and fp8(name, sub)}
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name in quantised:
            rows = tensor.shape[0]
            total += tensor.numel() + 4 * (rows if per_row_scales else 1)
        elif tensor.is_floating_point():
            total += tensor.numel() * bytes_per_element
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def build_on_meta() -> dict[str, object]:
    """Every real-size model, on the meta device (no weights): transformers for dev and schnell, T5, CLIP, VAE and
    the two safety stages."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        CLIPConfig,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
        ViTConfig,
        ViTForImageClassification,
    )

    with torch.device("meta"):
        models = {
            f"transformer-{model}": FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=GUIDANCE_EMBEDS[model])
            for model in MODELS
        }
        models["t5"] = T5EncoderModel(T5Config(**T5_XXL))
        models["clip"] = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
        models["vae"] = AutoencoderKL(**VAE)
        models["safety-stage1"] = StableDiffusionSafetyChecker(
            CLIPConfig(vision_config=SAFETY_STAGE1_VISION, projection_dim=SAFETY_STAGE1_PROJECTION)
        )
        models["safety-stage2"] = ViTForImageClassification(ViTConfig(**SAFETY_STAGE2))
    return models


@dataclass(frozen=True)
class Sizes:
    """Bytes per variant ("dev-bf16" ...) and per shared component ("T5 XXL encoder (bf16)" ...)."""

    variants: dict[str, int]
    shared: dict[str, int]

    @property
    def shared_total(self) -> int:
        return sum(self.shared.values())


def real_sizes(models: dict[str, object] | None = None, *, per_row_scales: bool = True) -> Sizes:
    """The real FLUX.1 components' sizes as they sit on the GPU (about 10 s to build the models on meta)."""
    from flux.fast.quantize import is_quantised_linear

    models = models or build_on_meta()
    variants = {}
    for model in MODELS:
        transformer = models[f"transformer-{model}"]
        variants[f"{model}-bf16"] = module_bytes(transformer, BF16)
        variants[f"{model}-fp8"] = module_bytes(transformer, BF16, fp8=is_quantised_linear, per_row_scales=per_row_scales)
    shared = {
        "T5 XXL encoder (bf16)": module_bytes(models["t5"], BF16),
        "CLIP text encoder (bf16)": module_bytes(models["clip"], BF16),
        "VAE (bf16)": module_bytes(models["vae"], BF16),
        "safety stage 1, CLIP ViT-L (fp16)": module_bytes(models["safety-stage1"], FP16),
        "safety stage 2, ViT-base (fp32)": module_bytes(models["safety-stage2"], FP32),
    }
    return Sizes(variants, shared)


# --- the decision ------------------------------------------------------------------------------------------

RESIDENT, SWAPPED, LAZY = "resident", "swapped", "lazy"


@dataclass(frozen=True)
class SetupStep:
    action: str
    gpu_bytes: int  # on the GPU once the step is done
    host_bytes: int  # pinned host memory once the step is done
    bf16_copies: dict[str, int]  # full bf16 transformers alive per model, GPU and host together


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    reserve: int
    host_budget: int
    shared: int
    resident_bytes: int  # shared components + resident variants
    placement: dict[str, str]  # variant -> resident / swapped / lazy
    slot: int  # GPU bytes kept free for one swapped or lazy variant at a time (0 when there is none)
    steps: tuple[SetupStep, ...] = ()

    def variants(self, where: str) -> list[str]:
        return [variant for variant, place in self.placement.items() if place == where]

    @property
    def peak(self) -> int:
        """GPU bytes while serving at worst: shared + resident + one variant in the slot + the reserve."""
        return self.resident_bytes + self.slot + self.reserve

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def setup_peak(self) -> int:
        return max((step.gpu_bytes for step in self.steps), default=0)

    @property
    def max_bf16_copies(self) -> int:
        """The most full bf16 copies of any one transformer alive at once during setup (the rule: 1)."""
        return max((count for step in self.steps for count in step.bf16_copies.values()), default=0)


def plan_memory(
    sizes: Sizes, wanted: Sequence[str], *, budget: int, reserve: int, host_budget: int = 0,
    all_variants: Sequence[str] | None = None,
) -> MemoryPlan:
    """Place every variant (resident / swapped / lazy) for these wanted ones, in priority order; see the module
    docstring. all_variants: those a request may ask for (default: every model in bf16 and fp8)."""
    wanted = [str(Variant.parse(name)) for name in dict.fromkeys(wanted)]
    everyone = [str(Variant.parse(name)) for name in (all_variants or sizes.variants)]
    free = budget - reserve - sizes.shared_total
    resident = []
    for variant in wanted:
        if sizes.variants[variant] <= free - sum(sizes.variants[r] for r in resident):
            resident.append(variant)

    def slot_needed() -> int:
        return max((sizes.variants[v] for v in everyone if v not in resident), default=0)

    while resident and slot_needed() > free - sum(sizes.variants[r] for r in resident):
        resident.pop()  # the least wanted resident makes room for the slot

    placement, host = {}, 0
    for variant in [*wanted, *[v for v in everyone if v not in wanted]]:
        if variant in resident:
            placement[variant] = RESIDENT
        elif variant in wanted and host + sizes.variants[variant] <= host_budget:
            placement[variant] = SWAPPED
            host += sizes.variants[variant]
        else:
            placement[variant] = LAZY
    plan = MemoryPlan(
        budget=budget, reserve=reserve, host_budget=host_budget, shared=sizes.shared_total, placement=placement,
        resident_bytes=sizes.shared_total + sum(sizes.variants[v] for v in resident), slot=slot_needed(),
    )
    return _with_setup_steps(plan, sizes)


def _with_setup_steps(plan: MemoryPlan, sizes: Sizes) -> MemoryPlan:
    """Setup in order: shared components, then each resident variant onto the GPU, then each swapped variant
    into pinned host memory. bf16 is loaded once, to its one place; fp8 is built from the checkpoint file
    tensor by tensor (flux/fast/quantize.py), so it never needs a bf16 copy in memory."""
    gpu, host = plan.shared, 0
    copies = dict.fromkeys(MODELS, 0)
    steps = [SetupStep("text encoders, VAE, safety checker -> GPU", gpu, host, dict(copies))]
    for where in (RESIDENT, SWAPPED):
        for variant in plan.variants(where):
            size, parsed = sizes.variants[variant], Variant.parse(variant)
            if where == RESIDENT:
                gpu += size
            else:
                host += size
            if not parsed.fp8:
                copies[parsed.model] += 1
            how = "built from the checkpoint, tensor by tensor" if parsed.fp8 else "loaded"
            target = "GPU" if where == RESIDENT else "pinned host memory"
            steps.append(SetupStep(f"{variant} {how} -> {target}", gpu, host, dict(copies)))
    return replace(plan, steps=tuple(steps))


# --- defaults and settings ---------------------------------------------------------------------------------

def default_wanted(go_fast_default: bool) -> list[str]:
    """What the deployed class uses (flux.variants.default_resident), as names."""
    return [str(variant) for variant in default_resident(go_fast_default)]


def fit_to_gpu(wanted: Sequence[Variant], gpu_total: int, sizes: Sizes | None = None) -> tuple[Variant, ...]:
    """The wanted variants the plan keeps resident on a GPU of gpu_total bytes (real FLUX.1 sizes, counted on
    meta in a few seconds); the others are built on first use. Logs the plan's decision."""
    plan = plan_memory(sizes or real_sizes(), [str(v) for v in wanted], **budgets_from_settings(gpu_total))
    resident = tuple(v for v in wanted if plan.placement.get(str(v)) == RESIDENT)
    log.info(
        "GPU memory plan (%s GiB budget): resident %s; built on first use: %s; serving peak %s GiB",
        gib(plan.budget), ", ".join(map(str, resident)) or "none",
        ", ".join(v for v, where in plan.placement.items() if where != RESIDENT) or "none", gib(plan.peak),
    )
    return resident


def budgets_from_settings(gpu_total: int | None = None) -> dict[str, int]:
    """budget, reserve and host_budget from FLUX_GPU_MEMORY_GB, FLUX_GPU_RESERVE_GB and FLUX_PINNED_MEMORY_GB
    (GiB). Without FLUX_GPU_MEMORY_GB the budget is the GPU's total less 0.6 GiB (CUDA context), or 79 GiB."""
    if settings.is_set("FLUX_GPU_MEMORY_GB"):
        budget = int(settings.number("FLUX_GPU_MEMORY_GB") * GIB)
    else:
        budget = BUDGET_WITHOUT_GPU if gpu_total is None else gpu_total - int(0.6 * GIB)
    return dict(
        budget=budget,
        reserve=int(settings.number("FLUX_GPU_RESERVE_GB") * GIB),
        host_budget=int(settings.number("FLUX_PINNED_MEMORY_GB") * GIB),
    )


# --- the table ---------------------------------------------------------------------------------------------

def gib(count: int) -> str:
    return f"{count / GIB:.2f}"


def sizes_table(sizes: Sizes) -> str:
    """Markdown: component, dtype, GiB."""
    rows = ["| component | dtype | GiB |", "|---|---|---|"]
    for variant, size in sizes.variants.items():
        model, precision = variant.split("-")
        rows.append(f"| FLUX.1 {model} transformer | {precision} | {gib(size)} |")
    for name, size in sizes.shared.items():
        component, _, dtype = name.rpartition(" (")
        rows.append(f"| {component} | {dtype.rstrip(')')} | {gib(size)} |")
    rows.append(f"| shared components together | | {gib(sizes.shared_total)} |")
    return "\n".join(rows)


def plan_table(plan: MemoryPlan, sizes: Sizes, title: str) -> str:
    """Markdown: where each variant lives, and the GPU totals."""
    rows = [f"**{title}** (budget {gib(plan.budget)} GiB, reserve {gib(plan.reserve)} GiB for activations)", "",
            "| variant | GiB | placement |", "|---|---|---|"]
    rows += [f"| {variant} | {gib(sizes.variants[variant])} | {place} |" for variant, place in plan.placement.items()]
    rows += [
        f"| shared components | {gib(plan.shared)} | resident |",
        f"| slot for one swapped/lazy variant | {gib(plan.slot)} | kept free |",
        f"| **serving peak** (resident + slot + reserve) | **{gib(plan.peak)}** | {'fits' if plan.fits else 'DOES NOT FIT'} |",
        f"| setup peak (GPU) / most bf16 copies of one transformer | {gib(plan.setup_peak)} / {plan.max_bf16_copies} | |",
    ]
    return "\n".join(rows)
