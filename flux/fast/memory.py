"""The GPU memory plan: what each component of the real FLUX.1 weighs, and which variants fit on one GPU.

Sizes are counted, not guessed, by flux/fast/sizes.py (the real models built on the `meta` device).

`plan_memory()` is the decision for one deployed class (`Demand`: the variants it must serve, those a request
may ask for, those it wants resident), pure arithmetic on those sizes:
- CLIP, the VAE and the safety checker are on the GPU, once for all variants; `reserve` stays free for activations
  (the VAE tiles only where that room cannot hold one untiled 1440x1440 decode: `vae_tiling`, flux/vae.py).
- T5 (8.87 GiB) stays on the GPU when the class fits with it there; otherwise its 24 layers rest in pinned host
  memory and stream through the GPU for each request's encoding (flux/offload.py: 9.3 GB at about 25 GB/s, 0.4 s;
  two layers, 0.72 GiB, on the GPU at once, while no activations are held). fp8 weight-only T5 would save the copy
  but change every request's pixels: never chosen.
- Every variant a request may ask for that fits alone beside those is servable; the others are unavailable. The
  servable ones, wanted first, are resident while one `slot` for any other still fits beside them; a variant
  outside the resident set is built from the checkpoint into the slot when asked for (lazy).
- Streaming (16-24 GiB cards): when some variant does not fit whole, nothing is resident and every variant
  goes through the slot, which is all the room left; a variant larger than it streams the blocks that do not fit
  from pinned host memory at every step (`streamed`; flux/offload.py `spread`), two blocks in flight. Each step
  then costs at least streamed bytes / HOST_LINK seconds, overlapped with the compute.
- The class fits when each required variant is servable; if not, the plan holds one sentence that says why and
  what would fit, and `fit_to_gpu` refuses setup with it.
- LoRA originals: each variant in memory keeps the originals of the layers LoRAs touched on it (lora/apply.py),
  2 bytes per weight: 22.3 GiB for a LoRA on every Linear, bf16 or fp8 alike. The plan counts that for every
  resident variant and the slot's largest, and gives them the GPU room left beside everything else (a switch
  is then an HBM copy); what does not fit there goes to pinned host memory (a PCIe copy).
- Pinned host memory (`host_pinned`) is counted as torch takes it: in slabs, each rounded up to a power of two by
  the caching host allocator (weights/pinned.py): T5's layers, 8.63 GiB of tensors, take 9.00 GiB.
- setup never holds two full bf16 copies of one transformer (bf16 is loaded once, to one place; fp8 is built
  from the checkpoint tensor by tensor); the plan lists the setup steps with the copies alive after each.

Units are bytes; tables print GiB (an "80 GB" H100 has 80 GiB, 79.6 seen by torch; without a GPU the budget is 79).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import settings
from flux.fast.cards import GpuCannotServe
from flux.fast.sizes import T5, Sizes, real_sizes
from flux.vae import tiling_pays
from flux.variants import MODELS, Variant, default_resident
from units import GiB
from weights.pinned import SLAB_BYTES, arena_bytes, spilled_arena_bytes

if TYPE_CHECKING:
    from flux.fast.kernels import GoFastKernel

log = logging.getLogger(__name__)

GIB = GiB  # units.py; the name the plan's callers and tests use
BUDGET_WITHOUT_GPU = 79 * GIB  # one 80 GB H100 (79.6 GiB visible to torch), less room for the CUDA context

# --- the decision ------------------------------------------------------------------------------------------

RESIDENT, LAZY, UNAVAILABLE = "resident", "lazy", "unavailable"
GPU, HOST = "gpu", "host"
CUDA_CONTEXT = int(0.6 * GIB)  # taken by the CUDA context and libraries before the first tensor
HOST_LINK = 25e9  # bytes/s of pinned PCIe 4.0 x16 host-to-device copies, about
IN_FLIGHT = 2  # streamed blocks on the GPU at once: the one running and the next (flux/offload.py)
GPU_SIZES_GIB = (12, 16, 24, 48, 80, 141)  # the plans bench/benchmark --memory-plan prints (141: one H200)
# each deployed class of predict.py: (its go_fast default, whether its schema has a go_fast input)
DEPLOYED = {"Predictor": (False, True), "FastPredictor": (True, True), "LegacyPredictor": (False, False)}


class NotEnoughGpuMemory(GpuCannotServe):
    """Setup refuses a GPU too small for the deployed class. It is the operator's problem, not a request's (so no
    errors.UserError); the message names the GPU's size, what the class needs, and what would fit."""


@dataclass(frozen=True)
class Demand:
    """What a deployed class asks of the GPU, as variant names: each `required` one must fit (the class's default
    go_fast path), `servable` are all a request may ask for, `wanted` would be resident, most wanted first."""

    name: str
    required: tuple[str, ...]
    servable: tuple[str, ...]
    wanted: tuple[str, ...]


def demand_for(go_fast_default: bool, go_fast_input: bool = True, wanted: Sequence[Variant] | None = None) -> Demand:
    """The deployed class's demand; wanted: FLUX_RESIDENT_VARIANTS, else the class's default_resident."""
    name = next((n for n, flags in DEPLOYED.items() if flags == (go_fast_default, go_fast_input)), "this class")
    default = "fp8" if go_fast_default else "bf16"
    precisions = dict.fromkeys((default, "bf16", "fp8") if go_fast_input else ("bf16",))
    wanted = [str(v) for v in (default_resident(go_fast_default) if wanted is None else wanted)]
    servable = [f"{model}-{precision}" for precision in precisions for model in MODELS]
    return Demand(name, tuple(f"{model}-{default}" for model in MODELS), tuple(dict.fromkeys(servable + wanted)),
                  tuple(dict.fromkeys(wanted)))


@dataclass(frozen=True)
class SetupStep:
    action: str
    gpu_bytes: int  # on the GPU once the step is done
    host_bytes: int  # pinned host memory once the step is done
    bf16_copies: dict[str, int]  # full bf16 transformers alive per model, GPU and host together


@dataclass(frozen=True)
class MemoryPlan:
    demand: Demand
    budget: int  # GPU bytes the plan may use
    activations: int  # kept free for activations: the reserve, or more when T5 comes in for each encoding
    t5: str  # GPU: resident; HOST: pinned host memory, copied to the GPU for each request's encoding
    t5_bytes: int
    shared_gpu: int  # the shared components on the GPU (T5 only when resident)
    placement: dict[str, str]  # variant -> resident / lazy (built when asked for, in the slot) / unavailable
    resident_bytes: int  # the resident variants
    slot: int  # GPU bytes kept free for one lazy variant at a time (0 when there is none)
    lora_originals_bytes: int  # at worst: a LoRA on every Linear of each variant that may be in memory at once
    lora_originals_gpu: int  # GPU bytes they may take (lora.apply.OriginalsBudget); the rest are pinned host memory
    t5_pinned: int = 0  # pinned host bytes as torch takes them (weights/pinned.py): T5's, when it waits there
    lora_originals_pinned: int = 0  # and the LoRA originals' host share, at worst
    streamed: dict[str, tuple[int, ...]] = field(default_factory=dict)  # variant -> its blocks that stream each step
    streamed_bytes: dict[str, int] = field(default_factory=dict)  # and their bytes, which cross the host link per step
    streamed_pinned: int = 0  # pinned host bytes of the largest streamed variant (one is in the slot at a time)
    error: str | None = None  # why the class cannot be served here (one sentence); None when it fits
    steps: tuple[SetupStep, ...] = ()

    def variants(self, where: str) -> list[str]:
        return [variant for variant, place in self.placement.items() if place == where]

    @property
    def resident(self) -> tuple[Variant, ...]:
        """The variants setup builds and keeps, most wanted first (for FluxPipelines)."""
        return tuple(Variant.parse(variant) for variant in self.variants(RESIDENT))

    @property
    def fits(self) -> bool:
        return self.error is None

    @property
    def vae_tiling(self) -> bool:
        """Whether the VAE must tile: the activation room cannot hold one untiled 1440x1440 decode (flux/vae.py)."""
        return tiling_pays(self.activations)

    @property
    def warm_slot(self) -> Variant | None:
        """When nothing is resident, the most wanted lazy variant: setup may build it into the slot (it gives way
        to the next variant asked for), so the first request does not wait for it."""
        lazy = [v for v in self.demand.wanted if self.placement.get(v) == LAZY]
        return Variant.parse(lazy[0]) if lazy and not self.variants(RESIDENT) else None

    @property
    def lora_originals(self) -> str:
        """Where the originals of LoRA-touched layers are kept at worst: GPU, HOST, or both."""
        if self.lora_originals_gpu >= self.lora_originals_bytes:
            return GPU
        return HOST if self.lora_originals_gpu == 0 else f"{GPU}+{HOST}"

    @property
    def lora_originals_host(self) -> int:
        return self.lora_originals_bytes - self.lora_originals_gpu

    @property
    def host_pinned(self) -> int:
        """Pinned host bytes, slabs rounded as torch's caching host allocator takes them: T5 when it waits there,
        and the LoRA originals when they live there."""
        return self.t5_pinned + self.lora_originals_pinned + self.streamed_pinned

    @property
    def peak(self) -> int:
        """GPU bytes while serving at worst: shared + resident + the slot + GPU LoRA originals + activations."""
        return self.shared_gpu + self.resident_bytes + self.slot + self.lora_originals_gpu + self.activations

    @property
    def setup_peak(self) -> int:
        return max((step.gpu_bytes for step in self.steps), default=0)

    def streaming_note(self) -> str | None:
        """One sentence for setup's log: what streams from host memory, and its cost by arithmetic (HOST_LINK)."""
        parts = [
            f"FLUX {variant} streams {gib(nbytes)} GiB of its blocks at every step (at {HOST_LINK / 1e9:.0f} GB/s at "
            f"least {nbytes / HOST_LINK:.2f} s a step, overlapped with the step's compute)"
            for variant, nbytes in self.streamed_bytes.items()
        ]
        if self.t5 == HOST:
            parts.append(f"T5's layers stream for each prompt encoding ({self.t5_bytes / HOST_LINK:.2f} s)")
        return f"Streaming from pinned host memory: {'; '.join(parts)}." if parts else None

    @property
    def max_bf16_copies(self) -> int:
        """The most full bf16 copies of any one transformer alive at once during setup (the rule: 1)."""
        return max((count for step in self.steps for count in step.bf16_copies.values()), default=0)


def plan_memory(sizes: Sizes, demand: Demand, *, budget: int, reserve: int, gpu_total: int | None = None) -> MemoryPlan:
    """Place T5, every variant and the LoRA originals; see the module docstring. T5 stays on the GPU whenever the
    class fits with it there (no copy per request). gpu_total only names the GPU in the refusal."""
    plans = []
    for t5, streaming in ((GPU, False), (HOST, False), (HOST, True)):  # T5 streams before the transformer does
        plans.append(_place(sizes, demand, budget=budget, reserve=reserve, t5=t5, streaming=streaming))
        if plans[-1].fits and not plans[-1].variants(UNAVAILABLE):
            break
    # the first plan that serves every variant, else the first that serves the required ones (a fallback refused)
    serving = [plan for plan in plans if plan.fits]
    if serving:
        return _with_setup_steps(min(serving, key=lambda plan: len(plan.variants(UNAVAILABLE))), sizes)
    return _with_setup_steps(
        replace(plans[-1], error=_refusal(sizes, demand, budget=budget, reserve=reserve, gpu_total=gpu_total)), sizes)


def _place(sizes: Sizes, demand: Demand, *, budget: int, reserve: int, t5: str, streaming: bool) -> MemoryPlan:
    t5_away = (sum(sizes.streamable_blocks(T5)) or sizes.t5) if t5 == HOST else 0  # embedding, final norm stay
    in_flight = _t5_in_flight(sizes) if t5 == HOST else 0
    shared_gpu = sizes.shared_total - t5_away
    activations = max(reserve, in_flight)  # T5's layers stream in while no activations are held
    room = budget - shared_gpu - activations  # for transformers, the slot and GPU LoRA originals
    placement, resident, streamed = _transformers(sizes, demand, room, streaming)
    slot = max((_on_gpu(sizes, v, streamed.get(v, ())) for v in placement if placement[v] == LAZY), default=0)
    used = sum(sizes.variants[v] for v in resident) + slot
    lazy = [v for v in placement if placement[v] == LAZY]
    in_slot = max(lazy, key=lambda v: sizes.lora_originals.get(v, 0), default=None)
    in_memory = [*resident, *([in_slot] if in_slot else [])]
    originals = sum(sizes.lora_originals.get(v, 0) for v in in_memory)
    originals_gpu = max(0, min(originals, room - used))
    missing = [v for v in demand.required if placement.get(v) == UNAVAILABLE]
    streamed_bytes = {v: sum(sizes.streamable_blocks(v)[i] for i in blocks) for v, blocks in streamed.items()}
    return MemoryPlan(
        demand=demand, budget=budget, activations=activations, t5=t5, t5_bytes=sizes.t5, shared_gpu=shared_gpu,
        placement=placement, resident_bytes=sum(sizes.variants[v] for v in resident), slot=slot,
        lora_originals_bytes=originals, lora_originals_gpu=originals_gpu,
        t5_pinned=arena_bytes(sizes.blocks(T5)) if t5 == HOST else 0,
        # at worst a LoRA on every Linear, taken in module order; each variant's fuser has its own arena
        lora_originals_pinned=spilled_arena_bytes([sizes.blocks(v) for v in in_memory], originals_gpu),
        streamed=streamed, streamed_bytes=streamed_bytes,
        streamed_pinned=max((_slabs(n) for n in streamed_bytes.values()), default=0),
        error=f"{', '.join(missing)} do not fit" if missing else None,
    )


def _transformers(sizes: Sizes, demand: Demand, room: int, streaming: bool):
    """(placement of every variant, the resident ones, the blocks each streamed variant streams). Without
    streaming: the servable variants, wanted first, are resident while the slot for any other still fits. With
    it: none is resident, and each variant in the slot streams what does not fit in the room."""
    size = sizes.variants
    streamed = {}
    if streaming:
        for variant in demand.servable:
            if size[variant] > room and (blocks := stream_to_fit(sizes, variant, room)) is not None:
                streamed[variant] = blocks
    servable = [v for v in demand.servable if size[v] <= room or v in streamed]

    def slot(resident: list[str]) -> int:
        return max((size[v] for v in servable if v not in resident), default=0)

    resident: list[str] = []
    for variant in [] if streaming else dict.fromkeys([v for v in demand.wanted if v in servable] + servable):
        if sum(size[v] for v in [*resident, variant]) + slot([*resident, variant]) <= room:
            resident.append(variant)
    placement = {
        v: RESIDENT if v in resident else LAZY if v in servable else UNAVAILABLE
        for v in dict.fromkeys(demand.wanted + demand.servable)  # most wanted first
    }
    return placement, resident, streamed


def stream_to_fit(sizes: Sizes, variant: str, room: int) -> tuple[int, ...] | None:
    """The blocks `variant` streams to take at most `room` bytes on the GPU with IN_FLIGHT of them there at
    once, spread among the resident ones; None when even streaming every block but the first does not fit."""
    blocks = sizes.streamable_blocks(variant)
    if not blocks:
        return None
    excess = sizes.variants[variant] + IN_FLIGHT * max(blocks) - room
    chosen = tuple(spread(blocks, excess))
    return chosen if sum(blocks[i] for i in chosen) >= excess else None


def _on_gpu(sizes: Sizes, variant: str, streamed: Sequence[int]) -> int:
    """GPU bytes of a variant that streams these blocks: the rest, and IN_FLIGHT blocks in flight."""
    if not streamed:
        return sizes.variants[variant]
    blocks = sizes.streamable_blocks(variant)
    return sizes.variants[variant] - sum(blocks[i] for i in streamed) + IN_FLIGHT * max(blocks)


def _slabs(nbytes: int) -> int:
    """Pinned bytes of tensors of nbytes in all, packed into slabs (weights/pinned.py): whole slabs, one more."""
    return (-(-nbytes // SLAB_BYTES) + 1) * SLAB_BYTES


def spread(sizes: Sequence[int], streamed_bytes: int) -> list[int]:
    """Which blocks to stream (indices, in running order) so that at least `streamed_bytes` stream, spread evenly
    among the resident ones and never the first: each streamed block's copy then overlaps the compute of the
    blocks before it (flux/offload.py). Every block but the first when that is not enough; none for 0."""
    total = sum(sizes)
    if streamed_bytes <= 0 or total == 0:
        return []
    share, chosen, owed = min(1.0, streamed_bytes / total), [], 0.0
    for index, size in enumerate(sizes):
        owed += share * size
        if index > 0 and owed >= size / 2:
            chosen.append(index)
            owed -= size
    rest = [index for index in range(len(sizes) - 1, 0, -1) if index not in chosen]
    while sum(sizes[i] for i in chosen) < streamed_bytes and rest:
        chosen.append(rest.pop(0))
    return sorted(chosen)


def _least_gpu(sizes: Sizes, demand: Demand, reserve: int) -> tuple[int, int, int, int]:
    """GPU bytes the class needs at least, streaming all it can (T5's layers, every transformer block but the
    first): (in all, its largest required transformer's share, the other components', the activations')."""
    shared = sizes.shared_total - (sum(sizes.streamable_blocks(T5)) or sizes.t5)
    transformer = max(_on_gpu(sizes, v, range(1, len(sizes.streamable_blocks(v)))) for v in demand.required)
    activations = max(reserve, _t5_in_flight(sizes))
    return shared + transformer + activations, transformer, shared, activations


def _t5_in_flight(sizes: Sizes) -> int:
    """GPU bytes T5 takes while it encodes from host memory: IN_FLIGHT layers (all of it when it cannot stream)."""
    layers = sizes.streamable_blocks(T5)
    return IN_FLIGHT * max(layers) if layers else sizes.t5


def _refusal(sizes: Sizes, demand: Demand, *, budget: int, reserve: int, gpu_total: int | None) -> str:
    """One sentence: this GPU's size, what the class needs, and what would fit."""
    need, transformer, shared, activations = _least_gpu(sizes, demand, reserve)
    gpu = f"A {gib(gpu_total)} GiB GPU ({gib(budget)} GiB for the plan)" if gpu_total else f"A {gib(budget)} GiB budget"
    what = "fp8" if Variant.parse(demand.required[0]).fp8 else "bf16"
    options = [
        f"{name} ({gib(other)} GiB)" for name, flags in DEPLOYED.items()
        if (other := _least_gpu(sizes, demand_for(*flags), reserve)[0]) <= budget and name != demand.name
    ]
    largest_reserve = budget - shared - transformer
    if largest_reserve >= max(_t5_in_flight(sizes), GIB) and reserve > largest_reserve:
        options.append(f"FLUX_GPU_RESERVE_GB={largest_reserve // (GIB // 10) / 10:.1f} (less room for activations: "
                       "smaller images and fewer outputs per request)")
    options.append(f"a GPU of at least {-(-(need + CUDA_CONTEXT) // GIB)} GiB")
    return (
        f"{gpu} cannot serve {demand.name}: even streaming its {what} transformer's blocks and T5's layers from host "
        f"memory it needs {gib(need)} GiB ({gib(transformer)} GiB of the transformer, {gib(shared)} GiB for the "
        f"CLIP encoder, VAE, safety checker and T5's embedding, {gib(activations)} GiB for activations); "
        f"what would fit: {', or '.join(options)}."
    )


def _with_setup_steps(plan: MemoryPlan, sizes: Sizes) -> MemoryPlan:
    """Setup in order: the shared components (T5 to its place), then each resident variant onto the GPU. bf16 is
    loaded once, to its one place; fp8 is built from the checkpoint tensor by tensor, never from a bf16 copy."""
    gpu, host = plan.shared_gpu, plan.t5_pinned
    copies = dict.fromkeys(MODELS, 0)
    steps = [SetupStep(f"text encoders (T5 -> {plan.t5}), VAE, safety checker -> GPU", gpu, host, dict(copies))]
    for variant in plan.variants(RESIDENT):
        parsed = Variant.parse(variant)
        gpu += sizes.variants[variant]
        copies[parsed.model] += 0 if parsed.fp8 else 1
        how = "built from the checkpoint, tensor by tensor" if parsed.fp8 else "loaded"
        steps.append(SetupStep(f"{variant} {how} -> GPU", gpu, host, dict(copies)))
    return replace(plan, steps=tuple(steps))


# --- defaults and settings ---------------------------------------------------------------------------------

def fit_to_gpu(wanted: Sequence[Variant], gpu_total: int, *, go_fast_default: bool, go_fast_input: bool = True,
               sizes: Sizes | None = None, kernel: GoFastKernel | None = None) -> MemoryPlan:
    """The plan for the deployed class on a GPU of gpu_total bytes (real FLUX.1 sizes, counted on meta in a few
    seconds, fp8 variants in this GPU's go_fast `kernel`); wanted: the variants it would keep resident. Raises
    NotEnoughGpuMemory when the class cannot be served there, so setup fails with the reason instead of the first
    request running out of memory."""
    demand = demand_for(go_fast_default, go_fast_input, wanted)
    plan = plan_memory(sizes or real_sizes(kernel=kernel), demand, gpu_total=gpu_total, **budgets_from_settings(gpu_total))
    if not plan.fits:
        raise NotEnoughGpuMemory(plan.error)
    log.info(
        "GPU memory plan for %s (%s GiB budget): resident %s; built when asked for: %s; unavailable: %s; T5 on the "
        "%s; LoRA originals on the %s (%s GiB); serving peak %s GiB, %s GiB pinned host memory",
        demand.name, gib(plan.budget), *(", ".join(plan.variants(where)) or "none" for where in (RESIDENT, LAZY, UNAVAILABLE)),
        plan.t5, plan.lora_originals, gib(plan.lora_originals_bytes), gib(plan.peak), gib(plan.host_pinned),
    )
    if plan.streaming_note():
        log.info("%s", plan.streaming_note())
    return plan


def budgets_from_settings(gpu_total: int | None = None) -> dict[str, int]:
    """budget and reserve from FLUX_GPU_MEMORY_GB and FLUX_GPU_RESERVE_GB (GiB). Without FLUX_GPU_MEMORY_GB the
    budget is the GPU's total less the CUDA context (0.6 GiB), or 79 GiB without a GPU."""
    if settings.is_set("FLUX_GPU_MEMORY_GB"):
        budget = int(settings.number("FLUX_GPU_MEMORY_GB") * GIB)
    else:
        budget = BUDGET_WITHOUT_GPU if gpu_total is None else gpu_total - CUDA_CONTEXT
    return dict(budget=budget, reserve=int(settings.number("FLUX_GPU_RESERVE_GB") * GIB))


def plans_by_gpu(sizes: Sizes) -> dict[int, dict[str, MemoryPlan]]:
    """Each deployed class's plan on each GPU of GPU_SIZES_GIB (FLUX_GPU_RESERVE_GB applies; the budget is each
    GPU's total less the CUDA context)."""
    reserve, budgets = budgets_from_settings()["reserve"], {size: size * GIB - CUDA_CONTEXT for size in GPU_SIZES_GIB}
    return {size: {name: plan_memory(sizes, demand_for(*flags), budget=budget, reserve=reserve, gpu_total=size * GIB)
                   for name, flags in DEPLOYED.items()} for size, budget in budgets.items()}


def gib(count: int) -> str:
    return f"{count / GIB:.2f}"
