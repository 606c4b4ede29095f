"""torch.compile for the FLUX transformer by regions: the repeated blocks, compiled once, paid once per image.

- **Regional.** Only the 19 double and 38 single blocks are compiled (diffusers' `compile_repeated_blocks`, which
  calls `block.compile()` on each). Every block of a class runs the same `forward` code, and Dynamo keeps its
  graphs per code object, guarding on a block's parameters by type, shape and dtype, not identity: one graph
  serves all 19 double blocks. The single blocks need two, because the first gets contiguous inputs and the
  other 37 get views of the previous block's output (Dynamo guards on strides). The embedders and the output
  layer run eagerly (under 1% of the work).
- **Dynamic shapes.** `dynamic=True` traces every size symbolically from the first call: one graph serves every
  token count (aspect ratio and megapixels), and both text lengths (dev 512, schnell 256), so all fp8 variants
  share the same graphs. Marking the transformer's input dynamic would not reach the blocks: their inputs are new
  tensors made eagerly in between. A batch of one is specialised (a size of 1 always is), so the first batch of
  2 compiles once more; 3 and 4 reuse that graph. tests/test_compile.py counts it: 3 graphs for a batch of one
  at every size, 6 with batches of 2 to 4, for plain and for fp8 weights.
- **On demand.** An fp8 variant built for a request after setup (the 24/48 GiB plans' slot) is compiled with no
  warm-up when setup compiled a transformer of the same block shapes: its blocks hit setup's graphs, 0 new ones
  (`compile_reusing_graphs`, counted in tests/test_compile.py).
- **LoRAs.** Both fusers (lora/apply.py, flux/fast/lora_fp8.py) write fused values into the existing weight
  tensors, and the guards never look at values, so a LoRA switch compiles nothing.
- **Attention.** cuDNN's fused attention first on Hopper is an operator's opt-in (FLUX_CUDNN_ATTENTION=1):
  PyTorch turned it off by default for CUDA < 12.9 after a memory-correctness report (pytorch#169849, fixed by
  pytorch#171627), and cog.yaml pins CUDA 12.8. The kernel is chosen when a graph is traced.
- **Paid once.** `compile_for_serving` loads torch's cache artefacts (Inductor's FX graphs, AOTAutograd's graphs,
  Triton kernels, autotuning results) from FLUX_COMPILE_CACHE_DIR before compiling and saves them after the
  warm-up, so a second boot reads kernels instead of building them. One file per torch version and GPU model.

Compiling happens only on CUDA (FLUX_COMPILE=0 runs eagerly). The warm-up (FLUX_COMPILE_WARMUP=0 skips it) runs
one denoising step at the shapes that compile (see `warm_up_sizes`), so no request compiles.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import settings
from flux.sizes import MEGAPIXELS, SIZES_1MP, output_size

log = logging.getLogger(__name__)

# cuDNN first, the others as fallbacks in PyTorch's order (flash, memory-efficient, math). On Hopper cuDNN was
# measured 1.7-2.3x faster than flash at the same accuracy; slower on Ampere and Blackwell.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
WARM_UP_BATCH_SIZES = (1, 2)  # 1 compiles the graphs, 2 the batch-dynamic ones (used for 2..4)
# What torchao's quantize_ used to switch on for the whole process (flux/fast/quantize.py turns that off): it
# benchmarks every generated Triton kernel at compile time. Pass as compile_transformer(options=...) to compare.
TORCHAO_INDUCTOR_TUNING = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}


@dataclass(frozen=True)
class CompileReport:
    """What compile_for_serving did, for setup's log and the GPU check."""

    compiled: bool  # whether the transformer now runs compiled blocks
    cache_load_s: float = 0.0
    warm_up_s: float = 0.0  # the graphs compile inside the warm-up's first calls
    cache_save_s: float = 0.0
    graphs: int = 0  # graphs Dynamo captured during the warm-up
    cache_hits: int = 0  # Inductor graphs read from the cache instead of built
    cache_misses: int = 0


def attention_priority(
    device: torch.device, capability: tuple[int, int] | None = None, *, cudnn: bool | None = None
) -> list[SDPBackend] | None:
    """The SDPA backends in order of preference, or None for PyTorch's own order: cuDNN first on Hopper when
    the operator opts in (cudnn=None reads FLUX_CUDNN_ATTENTION)."""
    if cudnn is None:
        cudnn = settings.flag("FLUX_CUDNN_ATTENTION")
    if device.type != "cuda" or not cudnn:
        return None
    major, _ = capability or torch.cuda.get_device_capability(device)
    return CUDNN_FIRST if major == 9 else None


def prefer_attention(transformer: nn.Module, priority: Sequence[SDPBackend] | None) -> None:
    """Run the transformer's calls under this SDPA priority (None: PyTorch's order). A preference, not a
    restriction: shapes the first backend cannot serve fall back to the next. Compiled blocks keep the kernel
    chosen when they were traced, so to compare priorities: uncompile_transformer, torch._dynamo.reset(), then
    compile_transformer(attention=...)."""
    vars(transformer).pop("forward", None)
    if not priority:
        return
    priority = list(priority)
    eager_forward = transformer.forward

    @functools.wraps(eager_forward)  # the bound method: its signature, without self
    def forward(*args, **kwargs):
        with sdpa_kernel(priority, set_priority=True):
            return eager_forward(*args, **kwargs)

    transformer.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's


def compile_wanted(device: torch.device) -> bool:
    """Compile on CUDA unless FLUX_COMPILE=0."""
    return device.type == "cuda" and settings.flag("FLUX_COMPILE")


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The modules regional compilation compiles (the classes the model names in `_repeated_blocks`)."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return [module for module in transformer.modules() if type(module).__name__ in names]


def is_compiled(transformer: nn.Module) -> bool:
    return any(block._compiled_call_impl is not None for block in repeated_blocks(transformer))


def compile_transformer(
    transformer: nn.Module,
    *,
    backend: object = "inductor",
    fullgraph: bool = False,
    attention: Sequence[SDPBackend] | None = None,
    options: dict | None = None,
) -> None:
    """Compile the transformer's repeated blocks in place, shape-dynamic (see the module docstring).

    backend: "inductor" on GPU; tests pass a counting backend. fullgraph=True makes a graph break an error
    (the tests use it to show there is none); at setup a break only costs speed, so it is allowed.
    attention: SDPA backends in order of preference while compiling and running (None: PyTorch's order).
    options: Inductor settings for these graphs only (e.g. TORCHAO_INDUCTOR_TUNING), never process-wide."""
    if is_compiled(transformer):
        return
    prefer_attention(transformer, attention)
    extra = {"options": options} if options else {}
    transformer.compile_repeated_blocks(backend=backend, fullgraph=fullgraph, dynamic=True, **extra)


def uncompile_transformer(transformer: nn.Module) -> None:
    """Back to eager blocks and PyTorch's attention order (after a compile that failed at warm-up, say)."""
    for block in repeated_blocks(transformer):
        block._compiled_call_impl = None  # what nn.Module.compile() set; None is its "not compiled"
    prefer_attention(transformer, None)


def block_shapes(transformer: nn.Module) -> frozenset:
    """What the repeated blocks' graphs are specialised on: each block class with its parameters' names, types,
    shapes and dtypes. Transformers with equal block shapes (every fp8 FLUX.1 variant) run on the same graphs."""
    return frozenset(
        (type(block).__name__, tuple((name, type(value).__name__, tuple(value.shape), value.dtype)
                                     for name, value in block.named_parameters()))
        for block in repeated_blocks(transformer)
    )


def compile_reusing_graphs(
    transformer: nn.Module, compiled_shapes: Collection[frozenset], *, label: str, options: dict | None = None,
) -> bool:
    """Compile a transformer built for a request (a go_fast variant that is not resident) when setup compiled a
    transformer of the same block shapes: Dynamo keeps graphs per block class and guards on shapes and dtypes, not
    on the module, so its blocks run on setup's graphs and this costs no compile and no warm-up (tests/test_compile.py
    counts 0 new graphs). Otherwise it runs eagerly, as it would then compile inside the request, or fail in it
    where setup found compiling broken. options: as setup compiled with. Returns whether it compiled."""
    if block_shapes(transformer) not in compiled_shapes:
        return False
    compile_transformer(transformer, attention=attention_priority(transformer.device), options=options)
    log.info("%s: compiled on the graphs setup compiled (no warm-up)", label)
    return True


def every_request_size() -> list[tuple[int, int]]:
    """(width, height) of every aspect ratio at 1 MP and 0.25 MP, as requests ask for them."""
    return list(dict.fromkeys(output_size(ratio, megapixels) for megapixels in MEGAPIXELS for ratio in SIZES_1MP))


def warm_up_sizes() -> list[tuple[int, int]]:
    """The sizes setup warms up at, each at batches 1 and 2. The first (1 MP, 1:1, 4096 tokens) compiles every
    graph. The second (0.25 MP, 3:2, 988 tokens: not a multiple of 8) checks that a new token count compiles
    nothing; if it did (a backend that specialises on a size), setup warms up every request size."""
    return [output_size("1:1", "1"), output_size("3:2", "0.25")]


def warm_up(
    pipeline,
    sizes: Iterable[tuple[int, int]],
    *,
    max_sequence_length: int,
    batch_sizes: Sequence[int] = WARM_UP_BATCH_SIZES,
) -> float:
    """One denoising step at each size and batch size through the real pipeline call, so that every compile
    happens now and not in a user's request. Returns the seconds taken.

    The call matches FluxGenerator's: txt2img, under inference_mode, guidance only when the transformer has a
    guidance embedding. Dynamo guards on such details, so a different call would compile again later."""
    started = time.perf_counter()
    guidance = {"guidance_scale": 3.5} if pipeline.transformer.config.guidance_embeds else {}
    with torch.inference_mode():
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt="warm-up", prompt_2=None, max_sequence_length=max_sequence_length
        )
    for width, height, batch in [(*size, batch) for size in sizes for batch in batch_sizes]:
        size_started = time.perf_counter()
        with torch.inference_mode():
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


def _graphs_captured() -> int:
    return counters["stats"]["unique_graphs"]


def _warm_up_checked(pipeline, *, max_sequence_length: int, label: str) -> float:
    """warm_up at warm_up_sizes(); if the size that should reuse the graphs compiled, every request size too."""
    first, check = warm_up_sizes()
    seconds = warm_up(pipeline, [first], max_sequence_length=max_sequence_length)
    before = _graphs_captured()
    seconds += warm_up(pipeline, [check], max_sequence_length=max_sequence_length)
    if _graphs_captured() > before:
        log.warning("%s: a new image size compiled again; warming up every request size", label)
        seconds += warm_up(pipeline, every_request_size(), max_sequence_length=max_sequence_length)
    return seconds


# --- the persistent compile cache ----------------------------------------------------------------------------

_LOADED_CACHES: set[Path] = set()  # each cache file is read once per process, before the first compile


def compile_cache_file(device: torch.device) -> Path:
    """This torch version's and GPU model's cache file, in FLUX_COMPILE_CACHE_DIR (default: beside the weights,
    FLUX_WEIGHTS_DIR/.compile-cache, or .cache/compile-cache in the project when that is not set)."""
    folder = settings.text("FLUX_COMPILE_CACHE_DIR")
    if not folder:
        weights = settings.text("FLUX_WEIGHTS_DIR")
        project = Path(__file__).resolve().parents[2]
        folder = Path(weights) / ".compile-cache" if weights else project / ".cache" / "compile-cache"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return Path(folder).expanduser() / re.sub(r"[^\w.+-]+", "_", f"torch-{torch.__version__}-{gpu}.bin")


def load_compile_cache(file: Path) -> int:
    """Hand the saved artefacts to torch's caches (once per process); the number of artefacts, 0 if none."""
    if file in _LOADED_CACHES or not file.is_file():
        return 0
    _LOADED_CACHES.add(file)
    try:  # torch logs and returns None for a file it cannot read (cut short, from another torch)
        info = torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception:
        log.warning("Compile cache %s: unexpected error", file, exc_info=True)
        info = None
    if info is None:
        log.warning("Compile cache %s could not be loaded; compiling from scratch", file)
        return 0
    return sum(len(keys) for keys in info.artifacts.values())


def save_compile_cache(file: Path) -> int:
    """Write every artefact this process compiled or loaded, atomically; the bytes written (0: nothing to save,
    or the folder is read-only, e.g. a cache baked into the image)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, _ = saved
    partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        partial.replace(file)  # readers see the old file or the new one, never half of one
    except OSError as error:
        with contextlib.suppress(OSError):
            partial.unlink()
        log.warning("Compile cache not saved to %s (%s); the next boot compiles again", file.parent, error)
        return 0
    return len(data)


def compile_for_serving(pipeline, *, max_sequence_length: int, label: str, options: dict | None = None) -> CompileReport:
    """At setup, for one txt2img pipeline on CUDA: load the compile cache, compile the transformer's blocks, warm
    them up so no request compiles, and save the cache. Does nothing on CPU or with FLUX_COMPILE=0. If the
    warm-up fails because of compilation, the transformer runs eagerly (logged) rather than failing setup; if
    it fails without compile too, the model is broken and the error fails setup. options: Inductor settings for
    these graphs (go_fast's kernel's, flux/fast/kernels.py)."""
    transformer = pipeline.transformer
    device = transformer.device
    if not compile_wanted(device):
        return CompileReport(compiled=False)
    cache = compile_cache_file(device)
    started = time.perf_counter()
    artefacts = load_compile_cache(cache)
    cache_load_s = time.perf_counter() - started
    priority = attention_priority(device)
    compile_transformer(transformer, attention=priority, options=options)
    attention = "cuDNN first" if priority else "PyTorch's order"
    if not settings.flag("FLUX_COMPILE_WARMUP"):
        log.info("%s: compiled lazily (FLUX_COMPILE_WARMUP=0: the first request of each shape compiles); "
                 "attention: %s", label, attention)
        return CompileReport(compiled=True, cache_load_s=cache_load_s)
    before = {name: counters["inductor"][name] for name in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    graphs_before = _graphs_captured()
    try:
        warm_up_s = _warm_up_checked(pipeline, max_sequence_length=max_sequence_length, label=label)
    except Exception as error:
        uncompile_transformer(transformer)
        # The same warm-up without compile tells the two failures apart: if it fails too, the model does (a
        # device mismatch, an OOM) and setup must fail with it; if it runs, compilation was at fault.
        warm_up(pipeline, warm_up_sizes(), max_sequence_length=max_sequence_length)
        log.warning("%s: torch.compile failed during warm-up; running without compile", label, exc_info=error)
        return CompileReport(compiled=False, cache_load_s=cache_load_s)
    hits = counters["inductor"]["fxgraph_cache_hit"] - before["fxgraph_cache_hit"]
    misses = counters["inductor"]["fxgraph_cache_miss"] - before["fxgraph_cache_miss"]
    started = time.perf_counter()
    written = save_compile_cache(cache) if misses or not cache.is_file() else 0
    report = CompileReport(True, cache_load_s, warm_up_s, time.perf_counter() - started,
                           _graphs_captured() - graphs_before, hits, misses)
    log.info("%s: compiled %d graphs (%d from the cache, %d built) and warmed up in %.1fs; cache: %d artefacts "
             "loaded in %.1fs, %.0f MB saved in %.1fs (%s); attention: %s", label, report.graphs, hits, misses,
             warm_up_s, artefacts, cache_load_s, written / 1e6, report.cache_save_s, cache, attention)
    return report
