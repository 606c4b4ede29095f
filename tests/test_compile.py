"""Regional torch.compile of the transformer (flux/fast/compile.py), proved on CPU with a counting backend.

The counting backend runs the captured graphs eagerly, so these tests see exactly what Dynamo captures and when it
recompiles, without inductor's minutes of code generation. They show: 3 block graphs (one for the double blocks,
two for the single blocks: contiguous and strided inputs) for every image size, both text lengths and every LoRA
state, plain and fp8 weights; 3 more for batches of 2 to 4; that the compiled blocks compute with the weights as
they are now; and that setup's 4-step warm-up leaves nothing to compile for requests. The compile cache's save and
load round trip runs the real inductor, on a tiny module.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import FluxPipeline
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

from flux.fast import compile as fast_compile
from flux.fast.compile import (
    attention_priority,
    compile_cache_file,
    compile_for_serving,
    compile_transformer,
    compile_wanted,
    every_request_size,
    is_compiled,
    load_compile_cache,
    prefer_attention,
    save_compile_cache,
    uncompile_transformer,
    warm_up_sizes,
)
from flux.fast.kernels import go_fast_kernel, kernel_for
from flux.fast.lora_fp8 import Fp8LoraFuser
from flux.fast.quantize import is_quantised, is_quantised_linear, quantise_weight
from flux.pipelines import FluxPipelines
from flux.variants import Variant
from lora.apply import LoraFuser
from lora.formats import LoraWeights, convert_lora
from tests.fixtures import lora_factory as factory
from weights.store import WeightsFolder
from weights.tiny.flux import tiny_transformer

TEXT_TOKENS = 64  # the transformer's text length is fixed per model; short keeps the test fast
# sizes shaped like 1:1, 16:9, 9:16 and 21:9, small to keep the test fast (tokens = w/16 * h/16)
SIZES = [(256, 256), (336, 192), (192, 336), (384, 160)]
BLOCK_GRAPHS = 3  # the double block's graph, and the single block's for contiguous and for strided inputs


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations from an empty Dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(width: int, height: int, batch: int = 1, text: int = TEXT_TOKENS, guidance: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    tokens = (width // 16) * (height // 16)
    inputs = dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=generator),
        pooled_projections=torch.randn(batch, 32, generator=generator),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )
    return inputs | ({"guidance": torch.full((batch,), 3.5)} if guidance else {})


def _run(transformer: nn.Module, inputs: dict, *, eager: bool = False) -> torch.Tensor:
    """The transformer's output; eager=True runs the compiled blocks' code without their graphs."""
    with torch.inference_mode(), torch.compiler.set_stance("force_eager" if eager else "default"):
        return transformer(**inputs, return_dict=False)[0]


def _loras(transformer: nn.Module) -> list[LoraWeights]:
    loras = []
    for seed in (1, 2):
        spec = factory.make_spec(transformer, rank=4, seed=seed, magnitude=0.1)
        tensors, _ = factory.LAYOUTS["diffusers"](spec, transformer)
        loras.append(convert_lora(tensors, input_name="lora_weights", transformer=transformer, identity=f"lora{seed}"))
    return loras


def _plain():
    transformer = tiny_transformer(guidance_embeds=True).eval()
    return transformer, LoraFuser({"transformer": transformer})


def _quantised(capability: tuple[int, int] | None = None):
    """The tiny transformer with go_fast's weights for this GPU (None: the CPU's fp8), quantised as
    flux/fast/quantize.py builds them, and go_fast's fuser re-quantising LoRAs from the original weights."""
    transformer = tiny_transformer(guidance_embeds=True).eval()
    config = kernel_for(capability, torch.float32).config
    originals = {}
    for name, module in transformer.named_modules():
        if is_quantised_linear(name, module):
            originals[f"transformer.{name}"] = module.weight.detach().clone()
            module.weight = nn.Parameter(quantise_weight(module.weight.detach(), config), requires_grad=False)
    assert sum(is_quantised(w) for w in transformer.parameters()) == len(originals) > 0
    fuser = Fp8LoraFuser({"transformer": transformer}, read_source=lambda path, device: originals[path].to(device),
                          config=config)
    return transformer, fuser


class CountingBackend:
    """Runs each captured graph eagerly, and keeps it for inspection."""

    def __init__(self):
        self.graphs = []

    @property
    def count(self) -> int:
        return len(self.graphs)

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward


def _placeholders(graph_module) -> list:
    return [node for node in graph_module.graph.nodes if node.op == "placeholder"]


def _block_kind(graph_module) -> str:
    """Which block class a graph came from, by the parameters it takes (only double blocks have norm1_context)."""
    names = " ".join(node.name for node in _placeholders(graph_module))
    return "double" if "norm1_context" in names else "single"


def _switch_loras_across_sizes(transformer: nn.Module, fuser: LoraFuser, backend: CountingBackend, sizes) -> None:
    """LoRA states x sizes, each output checked against the eager model; no recompile allowed after the first."""
    first, second = _loras(transformer)
    without_lora = {}
    for step, loras in enumerate([[], [(first, 1.0)], [(second, 0.8)], [(first, 0.5), (second, -1.0)], []]):
        fuser.apply(loras)
        for size in sizes:
            inputs = _inputs(*size)
            compiled = _run(transformer, inputs)
            # the compiled graphs read the weights as the fuser left them, not as they were at compile time
            torch.testing.assert_close(compiled, _run(transformer, inputs, eager=True), rtol=1e-5, atol=1e-5)
            if not loras:
                without_lora.setdefault(size, compiled)
                assert torch.equal(compiled, without_lora[size])  # LoRAs come off exactly
            else:
                assert not torch.allclose(compiled, without_lora[size])  # the LoRA is in effect
            assert backend.count == BLOCK_GRAPHS, f"recompiled at step {step}, size {size}"


def test_plain_weights_three_block_graphs_for_every_size_lora_and_text_length():
    transformer, fuser = _plain()
    backend = CountingBackend()
    # fullgraph=True: a graph break would be an error. attention: math is the one SDPA backend every device has;
    # the preference must not disturb the capture.
    compile_transformer(transformer, backend=backend, fullgraph=True, attention=[SDPBackend.MATH])
    assert is_compiled(transformer)
    _switch_loras_across_sizes(transformer, fuser, backend, SIZES)

    assert sorted(_block_kind(graph) for graph in backend.graphs) == ["double", "single", "single"]
    for graph in backend.graphs:
        assert any(isinstance(node.meta.get("example_value"), torch.SymInt) for node in _placeholders(graph)), \
            "the token count should be a symbolic size in every graph"

    # schnell (no guidance embedding, half the text length) reuses dev's graphs: every fp8 variant shares them
    schnell = tiny_transformer(guidance_embeds=False, seed=1).eval()
    compile_transformer(schnell, backend=backend, fullgraph=True)
    _run(schnell, _inputs(*SIZES[1], text=TEXT_TOKENS // 2, guidance=False))
    assert backend.count == BLOCK_GRAPHS
    # a batch of one is specialised (as a size of 1 always is); batches of 2 to 4 share one more set of graphs
    for batch, size in [(2, SIZES[0]), (3, SIZES[1]), (4, SIZES[2])]:
        _run(transformer, _inputs(*size, batch=batch))
        _run(schnell, _inputs(*size, batch=batch, text=TEXT_TOKENS // 2, guidance=False))
    assert backend.count == 2 * BLOCK_GRAPHS


@pytest.mark.parametrize("capability", [None, (8, 6)], ids=["cpu-fp8", "ampere-int8"])  # int8's matmul runs on CPU too
def test_quantised_weights_three_block_graphs_for_every_size_and_lora(capability):
    transformer, fuser = _quantised(capability)
    backend = CountingBackend()
    compile_transformer(transformer, backend=backend, fullgraph=True)
    _switch_loras_across_sizes(transformer, fuser, backend, SIZES[:2])  # 8-bit runs slowly on CPU; sizes are shown above
    assert sorted(_block_kind(graph) for graph in backend.graphs) == ["double", "single", "single"]


def test_uncompile_runs_the_blocks_eagerly_again():
    transformer, _ = _plain()
    backend = CountingBackend()
    compile_transformer(transformer, backend=backend, attention=[SDPBackend.MATH])
    uncompile_transformer(transformer)
    assert not is_compiled(transformer) and "forward" not in vars(transformer)
    _run(transformer, _inputs(*SIZES[0]))
    assert backend.count == 0


def test_cudnn_attention_is_an_opt_in_on_hopper(monkeypatch):
    monkeypatch.delenv("FLUX_CUDNN_ATTENTION", raising=False)
    assert attention_priority(torch.device("cuda"), capability=(9, 0)) is None  # off by default (CUDA 12.8)
    monkeypatch.setenv("FLUX_CUDNN_ATTENTION", "1")
    assert attention_priority(torch.device("cpu")) is None
    hopper = attention_priority(torch.device("cuda"), capability=(9, 0))
    assert hopper[0] == SDPBackend.CUDNN_ATTENTION  # a preference: the others stay as fallbacks, in order
    assert hopper[1:] == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for capability in [(8, 0), (8, 9), (10, 0), (12, 0)]:  # cuDNN is slower than flash on Ampere and Blackwell
        assert attention_priority(torch.device("cuda"), capability=capability) is None
    # the GPU check compares both on one machine, whatever the setting says
    assert attention_priority(torch.device("cuda"), capability=(9, 0), cudnn=False) is None


def test_prefer_attention_sets_the_priority_during_calls_only():
    transformer, _ = _plain()
    seen = []
    transformer.x_embedder.register_forward_pre_hook(
        lambda *_: seen.append(torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True)))
    default = torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True)
    wanted = [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION]
    prefer_attention(transformer, wanted)
    _run(transformer, _inputs(*SIZES[0]))
    assert seen[-1][:2] == wanted
    assert torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True) == default  # restored after the call
    prefer_attention(transformer, None)
    _run(transformer, _inputs(*SIZES[0]))
    assert seen[-1] == default


def test_compile_only_on_cuda_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FLUX_COMPILE", raising=False)
    assert not compile_wanted(torch.device("cpu"))
    assert compile_wanted(torch.device("cuda"))
    monkeypatch.setenv("FLUX_COMPILE", "0")
    assert not compile_wanted(torch.device("cuda"))


def test_warm_up_sizes_are_two_request_sizes_with_different_token_alignment():
    sizes = warm_up_sizes()
    assert sizes == [(1024, 1024), (608, 416)] and set(sizes) <= set(every_request_size())
    assert [(w // 16) * (h // 16) % 8 for w, h in sizes] == [0, 4]  # 4096 and 988 tokens
    assert len(every_request_size()) == 22


def test_quantising_leaves_inductor_settings_alone():
    """torchao's default would switch on coordinate-descent tuning for the whole process at every quantize_."""
    config = go_fast_kernel(torch.device("cpu"), torch.float32).config
    assert config.set_inductor_config is False
    before = torch._inductor.config.coordinate_descent_tuning
    quantise_weight(torch.randn(32, 32), config)
    assert torch._inductor.config.coordinate_descent_tuning == before is False


# --- warm-up through the real pipeline call ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipeline(tiny_weights):
    pipeline = FluxPipeline.from_pretrained(tiny_weights.dev, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def compile_on_cpu(monkeypatch, tmp_path):
    """The device gate (tested above) open, and the compile cache in a folder of the test's own."""
    monkeypatch.setattr(fast_compile, "compile_wanted", lambda device: True)
    monkeypatch.setenv("FLUX_COMPILE_CACHE_DIR", str(tmp_path / "compile-cache"))


@pytest.fixture
def fresh_pipeline(tiny_pipeline, compile_on_cpu):
    """The tiny pipeline with its transformer not compiled (each test compiles with its own counter)."""
    yield tiny_pipeline
    uncompile_transformer(tiny_pipeline.transformer)


TEXT_LENGTH = 64  # dev uses 512; any fixed length shows the same, and a short one is faster


def _request_like_generate(pipeline: FluxPipeline, width: int, height: int, images: int) -> None:
    """The transformer-facing part of FluxGenerator._denoise's call (flux/generate.py)."""
    with torch.inference_mode():
        pipeline(
            prompt="a photo of TOK", num_inference_steps=1, num_images_per_prompt=images,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in range(images)],
            max_sequence_length=TEXT_LENGTH, output_type="pil", width=width, height=height, guidance_scale=3.5,
        )


def _compile_with(monkeypatch, backend, dynamic: bool | None = True) -> None:
    """compile_for_serving's compile, with this backend in place of inductor."""
    monkeypatch.setattr(fast_compile, "compile_transformer",
                        lambda t, **kw: t.compile_repeated_blocks(backend=backend, dynamic=dynamic))


def test_compile_for_serving_warms_up_so_requests_compile_nothing(fresh_pipeline, monkeypatch, caplog):
    backend = CountingBackend()
    _compile_with(monkeypatch, backend)
    monkeypatch.setattr(fast_compile, "warm_up_sizes", lambda: [(256, 256), (208, 240)])  # 256 and 195 tokens

    monkeypatch.setenv("FLUX_COMPILE_WARMUP", "0")
    report = compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8")
    assert report.compiled and is_compiled(fresh_pipeline.transformer) and backend.count == 0  # compiled lazily

    uncompile_transformer(fresh_pipeline.transformer)
    monkeypatch.delenv("FLUX_COMPILE_WARMUP")
    with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
        report = compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8")
    assert "dev-fp8: compiled 6 graphs" in caplog.text and "every request size" not in caplog.text
    assert report.compiled and report.graphs == backend.count == 2 * BLOCK_GRAPHS and report.warm_up_s > 0
    assert (report.cache_hits, report.cache_misses) == (0, 0)  # no inductor here, so nothing to cache

    # requests at sizes and batch sizes the warm-up did not use compile nothing more
    _request_like_generate(fresh_pipeline, 256, 384, images=1)
    _request_like_generate(fresh_pipeline, 320, 256, images=3)
    assert backend.count == 2 * BLOCK_GRAPHS


def test_a_warm_up_size_that_compiles_again_warms_up_every_size(fresh_pipeline, monkeypatch, caplog):
    """A backend that specialises on sizes (here Dynamo's automatic dynamic shapes, which first compile static)."""
    backend = CountingBackend()
    _compile_with(monkeypatch, backend, dynamic=None)
    monkeypatch.setattr(fast_compile, "warm_up_sizes", lambda: [(256, 256), (208, 240)])
    monkeypatch.setattr(fast_compile, "every_request_size", lambda: [(256, 256), (208, 240), (320, 256)])
    steps = []
    hook = fresh_pipeline.transformer.register_forward_hook(lambda *_: steps.append(1))
    try:
        with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
            assert compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8").compiled
    finally:
        hook.remove()
    assert "a new image size compiled again; warming up every request size" in caplog.text
    assert steps == [1] * (2 * 2 + 3 * 2)  # the two warm-up sizes, then every request size, at batches 1 and 2


def test_a_compile_failure_at_warm_up_falls_back_to_eager(fresh_pipeline, monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor could not build a kernel")

    _compile_with(monkeypatch, broken_backend)
    with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
        assert not compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="schnell-fp8").compiled
    assert not is_compiled(fresh_pipeline.transformer)
    assert "running without compile" in caplog.text
    _request_like_generate(fresh_pipeline, 256, 256, images=1)  # serves eagerly


def test_a_model_failure_at_warm_up_fails_setup(fresh_pipeline, monkeypatch, caplog):
    """Issue 18, defect 12: an error that is not compilation's (a device mismatch, an OOM) must not be logged as
    a compile failure with the server going on to say READY."""
    def broken_model(_module, _args):
        raise RuntimeError("Expected all tensors to be on the same device")

    _compile_with(monkeypatch, CountingBackend())
    hook = fresh_pipeline.transformer.x_embedder.register_forward_pre_hook(broken_model)  # runs eagerly either way
    try:
        with caplog.at_level(logging.INFO, logger="flux.fast.compile"), pytest.raises(RuntimeError, match="same device"):
            compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8")
    finally:
        hook.remove()
    assert "running without compile" not in caplog.text


def _serving(tiny_weights, monkeypatch, backend) -> FluxPipelines:
    """The 24/48 GiB plan's pipelines: nothing resident, dev-fp8 compiled and warmed up at setup in the slot."""
    _compile_with(monkeypatch, backend)
    monkeypatch.setattr(fast_compile, "warm_up_sizes", lambda: [(256, 256), (208, 240)])
    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    return FluxPipelines(store, torch.device("cpu"), torch.float32, resident=(), warm=Variant("dev", "fp8"))


def test_an_fp8_variant_built_on_demand_runs_on_setups_graphs(tiny_weights, compile_on_cpu, monkeypatch, caplog):
    backend = CountingBackend()
    with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
        pipelines = _serving(tiny_weights, monkeypatch, backend)
        assert backend.count == 2 * BLOCK_GRAPHS  # setup's warm-up: batches of 1 and of 2 to 4

        schnell = pipelines.transformer("schnell-fp8")  # the slot's dev-fp8 gives way
        assert is_compiled(schnell) and not pipelines.is_loaded("dev-fp8")
        assert "FLUX schnell-fp8: compiled on the graphs setup compiled (no warm-up)" in caplog.text
        _request_like_generate(pipelines.get("schnell-fp8", "txt2img"), 320, 256, images=1)
        _request_like_generate(pipelines.get("schnell-fp8", "txt2img"), 256, 384, images=3)
        dev = pipelines.transformer("dev-fp8")  # built again, on demand this time
        assert is_compiled(dev)
        _request_like_generate(pipelines.get("dev-fp8", "txt2img"), 384, 256, images=2)
    assert backend.count == 2 * BLOCK_GRAPHS  # no graph for either build, nor for their requests


def test_an_fp8_variant_built_on_demand_stays_eager_when_setup_compiled_none(tiny_weights, compile_on_cpu, monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor could not build a kernel")

    pipelines = _serving(tiny_weights, monkeypatch, broken_backend)
    assert not is_compiled(pipelines.transformer("dev-fp8"))  # setup fell back to eager
    assert not is_compiled(pipelines.transformer("schnell-fp8"))  # so would a request: it is not compiled at all
    _request_like_generate(pipelines.get("schnell-fp8", "txt2img"), 256, 256, images=1)


# --- the persistent compile cache --------------------------------------------------------------------------

def test_the_cache_file_sits_beside_the_weights_unless_the_operator_chooses(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FLUX_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert compile_cache_file(cpu) == tmp_path / "weights" / ".compile-cache" / f"torch-{torch.__version__}-cpu.bin"
    monkeypatch.setenv("FLUX_COMPILE_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_file(cpu).parent == tmp_path / "mine"
    monkeypatch.delenv("FLUX_COMPILE_CACHE_DIR")
    monkeypatch.delenv("FLUX_WEIGHTS_DIR")
    assert compile_cache_file(cpu).parent.parts[-2:] == (".cache", "compile-cache")


class TinyBlock(nn.Module):
    """Small enough for inductor's CPU code generation to take seconds. Defined here, not in torch.nn, because
    Dynamo does not trace torch's own module classes as user code."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _compile_and_run(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Output, and Inductor graphs read from its cache / built, for a freshly compiled TinyBlock."""
    torch._dynamo.reset()
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    block = TinyBlock()
    block.compile(backend="inductor", dynamic=True)
    with torch.inference_mode():
        out = block(x)
    return out, counters["inductor"]["fxgraph_cache_hit"] - hits, counters["inductor"]["fxgraph_cache_miss"] - misses


def test_the_compile_cache_round_trip_reuses_the_kernels(tmp_path, caplog):
    """Boot 1 compiles and saves; boot 2, with torch's own caches empty, loads the file and builds nothing."""
    from torch._inductor.utils import fresh_cache  # a new, empty Inductor cache folder: a new container's /tmp

    file, x = tmp_path / "cache" / "kernels.bin", torch.randn(5, 8)
    with fresh_cache():
        first, hits, misses = _compile_and_run(x)
        assert (hits, misses) == (0, 1)
        (tmp_path / "a-file").write_text("")
        with caplog.at_level(logging.WARNING, logger="flux.fast.compile"):  # a folder it cannot write: logged
            assert save_compile_cache(tmp_path / "a-file" / "kernels.bin") == 0
        assert "Compile cache not saved" in caplog.text
        assert save_compile_cache(file) > 0 and [path.name for path in file.parent.iterdir()] == ["kernels.bin"]
    with fresh_cache():
        assert load_compile_cache(file) >= 2  # the Inductor graph and the AOTAutograd one at least
        assert load_compile_cache(file) == 0  # once per process
        second, hits, misses = _compile_and_run(x)
        assert (hits, misses) == (1, 0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_a_damaged_or_missing_cache_means_compiling_from_scratch(tmp_path, caplog):
    damaged = tmp_path / "damaged.bin"
    damaged.write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING, logger="flux.fast.compile"):
        assert load_compile_cache(damaged) == 0
    assert "could not be loaded; compiling from scratch" in caplog.text
    assert load_compile_cache(tmp_path / "missing.bin") == 0
