"""One prediction, start to finish: LoRAs, the diffusion run, the safety check and the output files."""

from __future__ import annotations

import atexit
import gc
import logging
import shutil
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

import settings
from errors import UserError
from flux.fast.cards import GpuCannotServe, card_refusal
from flux.fast.kernels import GoFastKernel, go_fast_kernel
from flux.lora_scales import configured_fused_scales
from flux.lora_state import LoraState
from flux.metadata import image_records
from flux.output import save_images
from flux.pipelines import MAX_SEQUENCE_LENGTH, FluxPipelines, dtype_name, pick_device, pick_dtype
from flux.request import GenerationRequest
from flux.variants import Variant, go_fast_fallback, resident_variants, variant_for
from lora.apply import OriginalsBudget
from safety.checker import SafetyChecker
from weights.locations import WeightPaths, resolve_weight_paths
from weights.store import ModelStore, WeightsFolder

log = logging.getLogger(__name__)

_SHORT_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}  # as FLUX_DTYPE and the variants name them


class RunCancelled(Exception):
    """Raised inside the compute thread to stop a run whose caller was interrupted."""


@contextmanager
def phase(name: str):
    started = time.perf_counter()
    yield
    log.info("%s took %.2fs", name, time.perf_counter() - started)


class FluxGenerator:
    """Holds the loaded models; `run` turns a validated request into image files."""

    @classmethod
    def for_deployment(cls, setup_weights: str | None, *, go_fast_default: bool, has_go_fast: bool = True) -> FluxGenerator:
        """What cog's setup() builds: the weights this machine should run (downloaded or checked first), and
        the main LoRA the deployment names (cog's setup weights, else FLUX_DEFAULT_LORA)."""
        from flux.inputs import claim_upload_folder
        from flux.lora_state import default_main_lora
        from lora.download.redaction import install_redaction
        from safety.checker import quiet_safety_checker_logs

        install_redaction()  # before any download: no query string (a signed URL's signature) in the HTTP libraries' logs
        quiet_safety_checker_logs()
        claim_upload_folder()  # cog saves URL and data-URI inputs there; request file paths elsewhere are refused
        with phase("Finding and checking the weights"):  # fetches missing folders first (their own log lines)
            paths = resolve_weight_paths(cuda_available=pick_device().type == "cuda")
        return cls(paths, default_lora=default_main_lora(setup_weights), go_fast_default=go_fast_default, has_go_fast=has_go_fast)

    def __init__(self, weights: WeightPaths, default_lora: str | None = None, *, go_fast_default: bool = False,
                 has_go_fast: bool = True, store: ModelStore | None = None):
        """go_fast_default: the deployed schema's default, which decides the resident variants (flux/variants.py);
        has_go_fast: whether its schema has a go_fast input at all (the GPU memory plan counts fp8 only then).
        store: where the FLUX components come from (default: the weights' folders; script/gpu_check passes
        synthetic weights made on the GPU)."""
        if weights.tiny:
            log.warning(
                "Using the TINY random test weights (no GPU or no real weights configured): images are noise. "
                "Set FLUX_WEIGHTS_DIR to real FLUX weights to generate real images."
            )
        self.device = pick_device()
        self.dtype = pick_dtype(self.device)
        self._has_go_fast = has_go_fast
        placement = Placement(resident=resident_variants(go_fast_default))  # CPU, tiny weights: no plan needed
        if self.device.type == "cuda" and not weights.tiny:
            card = torch.cuda.get_device_properties(self.device)
            if refusal := card_refusal(card.name, (card.major, card.minor), card.total_memory):
                raise GpuCannotServe(refusal)
            placement = _memory_plan(placement.resident, card.total_memory, go_fast_default=go_fast_default, has_go_fast=has_go_fast,
                                     kernel=go_fast_kernel(self.device, self.dtype))
        self.pipelines = FluxPipelines(
            store or WeightsFolder(weights.dev, weights.schnell), self.device, self.dtype, resident=placement.resident,
            unavailable=placement.unavailable, t5_on_host=placement.t5_on_host, vae_tiling=placement.vae_tiling,
            warm=placement.warm, streamed=placement.streamed,
        )
        self.safety = SafetyChecker.load(weights.safety_stage1, weights.safety_stage2, self.device)  # logs its time
        self.loras = LoraState(self.pipelines, default_lora, originals_budget=placement.originals_budget)
        if default_lora:
            with phase("Loading the default main LoRA (used when replicate_weights is empty)"):
                self.loras.preload_default()
        self._last_out_dir: Path | None = None
        atexit.register(self._remove_last_output_dir)  # the last request's files go when the process does
        # cog calls run() on a new thread each time; torch's CPU thread pool is per calling thread, so
        # running all model work on one long-lived thread avoids building a new pool per request (~10% on CPU)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-compute")
        self._cancel = threading.Event()

    def run(self, request: GenerationRequest) -> list[Path]:
        """Run on the compute thread. If the calling thread is interrupted (cog's cancel, Ctrl-C), the run stops
        at its next denoising step, and this returns only once it has, so the next request starts clean."""
        self._cancel.clear()
        future = self._compute.submit(self._run, request)
        try:
            return _wait(future)
        except BaseException:
            self._cancel.set()
            while not future.done():
                with suppress(BaseException):  # a second cancel while we wait changes nothing
                    _wait(future)
            raise

    def _run(self, request: GenerationRequest) -> list[Path]:
        """_generate(), with running out of GPU memory anywhere in it (a LoRA fuse, a variant's build, denoising,
        the VAE) told to the user as what to change, once the memory is free for the next request."""
        try:
            return self._generate(request)
        except torch.OutOfMemoryError as error:
            log.warning("Out of GPU memory: %s", error)
            _free_memory(error, self.device)
            raise out_of_memory_error(request, go_fast_input=self._has_go_fast) from error

    def _generate(self, request: GenerationRequest) -> list[Path]:
        log.info("Using seed: %d", request.seed)
        log.info("Mode: %s, model: %s, %dx%d, %d step(s)", request.mode, request.model, request.width, request.height, request.num_inference_steps)
        variant = self._variant(request)
        self.loras.prepare(request, variant, cancelled=self._cancel.is_set)  # a cancel also ends a LoRA download
        with phase("Denoising"):
            images = self._denoise(request, variant)
        out_dir = self._fresh_output_dir()
        records = self._records(request, variant) if settings.flag("FLUX_WRITE_METADATA") else None
        with phase("Safety check and encoding"), ThreadPoolExecutor(max_workers=1) as pool:
            # encode while the checker runs; files of dropped images are deleted before anyone sees them
            encoding = pool.submit(save_images, list(enumerate(images)), request.output_format, request.output_quality, out_dir, records)
            try:
                report = self.safety.check(images, disabled=request.disable_safety_checker)
            finally:
                paths = encoding.result()
            for index in report.dropped_indices:
                paths[index].unlink()
            return [path for _, path in report.kept_or_raise(paths)]

    def _variant(self, request: GenerationRequest) -> Variant:
        """fp8 for go_fast, except where the hosted model falls back to bf16 too (said in the log)."""
        reason = go_fast_fallback(has_image=request.image is not None, has_mask=request.mask is not None, custom_size=request.custom_size)
        variant = variant_for(request.model, go_fast=request.go_fast, fallback_reason=reason)
        if request.go_fast and reason:
            log.info("go_fast: running in %s instead of fp8 because of %s.", dtype_name(self.dtype), reason)
        elif request.go_fast:
            log.info("go_fast: running FLUX %s (%s).", variant, self.pipelines.go_fast.name)
        return variant

    def _records(self, request: GenerationRequest, variant: Variant) -> list[dict]:
        """What each image's file says about how it was made (flux/metadata.py): the LoRAs as `prepare` fused
        them, the deployment's main LoRA included, and the precision that ran."""
        loras = self.loras.requested(request)
        fused = configured_fused_scales([spec.scale for spec in loras], fp8=variant.fp8)
        precision = self.pipelines.go_fast.precision if variant.fp8 else _SHORT_DTYPE_NAMES[self.dtype]
        return image_records(request, loras, precision=precision, fused_scales=fused)

    def _denoise(self, request: GenerationRequest, variant: Variant) -> list[Image.Image]:
        pipe = self.pipelines.get(variant, request.mode)
        steps = request.num_inference_steps
        arguments = dict(
            prompt=request.prompt,
            num_inference_steps=steps,
            num_images_per_prompt=request.num_outputs,
            # one generator per image: image i is exactly what seed + i gives alone
            generator=[torch.Generator(self.device).manual_seed(s) for s in request.seeds],
            max_sequence_length=MAX_SEQUENCE_LENGTH[request.model],
            output_type="pil",
            callback_on_step_end=self._on_step,
            width=request.width,
            height=request.height,
        )
        if pipe.transformer.config.guidance_embeds:
            arguments["guidance_scale"] = request.guidance_scale  # schnell is distilled without guidance
        if request.image is not None:
            strength = request.prompt_strength
            if strength == 0:  # diffusers refuses to run zero steps; the last step alone keeps the image
                log.info("prompt_strength 0: running only the last step, so the image stays almost as it is.")
                strength = 1 / steps
            arguments.update(image=request.image, strength=strength)
        if request.mask is not None:
            arguments["mask_image"] = request.mask
        with torch.inference_mode():
            return pipe(**arguments).images

    def _on_step(self, pipe, step: int, timestep, tensors: dict) -> dict:
        if self._cancel.is_set():
            raise RunCancelled("the prediction was canceled")
        # img2img and inpaint run only the last `strength` share of the schedule, so ask the pipeline
        log.info("Step %d/%d", step + 1, pipe.num_timesteps)
        return tensors

    def _fresh_output_dir(self) -> Path:
        """A new folder per request; the previous one has been uploaded by now, so it is removed."""
        self._remove_last_output_dir()
        self._last_out_dir = Path(tempfile.mkdtemp(prefix="flux-out-"))
        return self._last_out_dir

    def _remove_last_output_dir(self) -> None:
        if self._last_out_dir is not None:
            shutil.rmtree(self._last_out_dir, ignore_errors=True)


def out_of_memory_error(request: GenerationRequest, *, go_fast_input: bool) -> UserError:
    """The user's side of a request that ran out of GPU memory: the inputs that decide how much it needs."""
    size = f"{request.width}x{request.height}"
    changes = [f"fewer num_outputs than {request.num_outputs}"] if request.num_outputs > 1 else []
    if request.image is not None:
        changes.append(f"a smaller image input than {size}")
    else:
        changes.append(f"a smaller size than {size} (megapixels, or width and height with aspect_ratio=custom)")
    bf16_anyway = go_fast_fallback(has_image=request.image is not None, has_mask=request.mask is not None,
                                   custom_size=request.custom_size)
    if go_fast_input and not request.go_fast and not bf16_anyway:
        changes.append("go_fast=true")  # the fp8 transformer leaves more room
    return UserError(f"The GPU ran out of memory for this request ({request.num_outputs} x {size}); "
                     f"try {', or '.join(changes)}.")


def _free_memory(error: BaseException, device: torch.device) -> None:
    """Free what the failed request held: its frames' tensors (the error's traceback keeps them alive otherwise,
    and it stays the cause of the user's error), then the CUDA cache, so the next request has the memory."""
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Placement:
    """Where things live, as FluxPipelines and LoraState take it: the GPU memory plan's decisions on CUDA with
    real weights; elsewhere the wanted variants resident and no limits."""

    resident: tuple[Variant, ...]
    unavailable: frozenset[Variant] = frozenset()
    t5_on_host: bool = False
    vae_tiling: bool = False
    warm: Variant | None = None
    originals_budget: OriginalsBudget | None = None
    streamed: dict[Variant, tuple[int, ...]] = field(default_factory=dict)  # blocks each variant streams per step


def _memory_plan(wanted: tuple[Variant, ...], gpu_total: int, *, go_fast_default: bool, has_go_fast: bool,
                 kernel: GoFastKernel) -> Placement:
    """The GPU memory plan's decisions (flux/fast/memory.py). Refuses setup, naming the GPU's size and what would
    fit, when the deployed class cannot be served here."""
    from flux.fast.memory import HOST, UNAVAILABLE, fit_to_gpu

    plan = fit_to_gpu(wanted, gpu_total, go_fast_default=go_fast_default, go_fast_input=has_go_fast, kernel=kernel)
    # the slot's room serves the LoRA originals too while no variant is built into it (flux/lora_state.py)
    originals_budget = OriginalsBudget(plan.lora_originals_gpu, lendable=plan.slot)
    if plan.warm_slot is not None:
        originals_budget.shrink()  # setup builds the warm variant into the slot
    return Placement(
        resident=plan.resident,
        unavailable=frozenset(Variant.parse(v) for v in plan.variants(UNAVAILABLE)),
        t5_on_host=plan.t5 == HOST,
        vae_tiling=plan.vae_tiling,
        originals_budget=originals_budget,
        warm=plan.warm_slot,
        streamed={Variant.parse(v): blocks for v, blocks in plan.streamed.items()},
    )


def _wait(future: Future) -> object:
    """future.result(), in slices: a blocking wait would not let cog's cancel exception reach this thread."""
    while True:
        try:
            return future.result(timeout=0.05)
        except TimeoutError:
            continue
