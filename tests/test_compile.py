"""torch.compile of the transformer (flux/fast/compile.py), proved on CPU with a counting backend.

The counting backend runs the captured graphs eagerly, so these tests see exactly what Dynamo captures and when it
recompiles, without inductor's minutes of code generation. They show: one graph for every image size (the token
dimension is dynamic), none more for LoRA switches (plain and fp8 weights), that the compiled model computes with
the weights as they are now, and that setup's warm-up (which also compiles the graph for batches of 2 to 4) leaves
nothing to compile for requests.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch import nn
from torch.nn.attention import SDPBackend

from flux.fast import compile as fast_compile
from flux.fast.compile import (
    attention_priority,
    compile_for_serving,
    compile_transformer,
    compile_wanted,
    is_compiled,
    warm_up_sizes,
)
from flux.fast.lora_fp8 import Fp8LoraFuser
from flux.fast.quantize import fp8_config, is_fp8, is_quantised_linear, quantise_weight
from lora.apply import LoraFuser
from lora.formats import LoraWeights, convert_lora
from tests.fixtures import lora_factory as factory
from weights.tiny.flux import tiny_transformer

TEXT_TOKENS = 64  # the transformer's text length is fixed per model; short keeps the test fast
# sizes shaped like 1:1, 16:9, 9:16 and 21:9, small to keep the test fast (tokens = w/16 * h/16)
SIZES = [(256, 256), (336, 192), (192, 336), (384, 160)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compilations from an empty Dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(width: int, height: int, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = (width // 16) * (height // 16)
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 32, generator=generator),
        pooled_projections=torch.randn(batch, 32, generator=generator),
        timestep=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
    )


def _run(transformer: nn.Module, inputs: dict, *, eager: bool = False) -> torch.Tensor:
    """The transformer's output; eager=True calls the class's forward, bypassing the compiled one."""
    with torch.inference_mode():
        if eager:
            return FluxTransformer2DModel.forward(transformer, **inputs, return_dict=False)[0]
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


def _fp8():
    """The tiny transformer with go_fast's fp8 weights, quantised as flux/fast/quantize.py builds them, and
    go_fast's fuser re-quantising LoRAs from the original weights."""
    transformer = tiny_transformer(guidance_embeds=True).eval()
    config = fp8_config(torch.device("cpu"), torch.float32)
    originals = {}
    for name, module in transformer.named_modules():
        if is_quantised_linear(name, module):
            originals[f"transformer.{name}"] = module.weight.detach().clone()
            module.weight = nn.Parameter(quantise_weight(module.weight.detach(), config), requires_grad=False)
    assert sum(is_fp8(w) for w in transformer.parameters()) == len(originals) > 0
    fuser = Fp8LoraFuser({"transformer": transformer}, read_source=originals.__getitem__, config=config)
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


def _switch_loras_across_sizes(transformer: nn.Module, fuser: LoraFuser, backend: CountingBackend, sizes) -> None:
    """LoRA states x sizes, each output checked against the eager model; no recompile allowed."""
    first, second = _loras(transformer)
    without_lora = {}
    for step, loras in enumerate([[], [(first, 1.0)], [(second, 0.8)], [(first, 0.5), (second, -1.0)], []]):
        fuser.apply(loras)
        for size in sizes:
            inputs = _inputs(*size)
            compiled = _run(transformer, inputs)
            # the compiled graph reads the weights as the fuser left them, not as they were at compile time
            torch.testing.assert_close(compiled, _run(transformer, inputs, eager=True), rtol=1e-5, atol=1e-5)
            if not loras:
                without_lora.setdefault(size, compiled)
                assert torch.equal(compiled, without_lora[size])  # LoRAs come off exactly
            else:
                assert not torch.allclose(compiled, without_lora[size])  # the LoRA is in effect
            assert backend.count == 1, f"recompiled at step {step}, size {size}"


def test_plain_weights_one_graph_for_every_size_and_lora():
    transformer, fuser = _plain()
    backend = CountingBackend()
    # fullgraph=True: a graph break would be an error. attention: math is the one SDPA backend every device has;
    # the wrapper must set the preference without disturbing the capture.
    compile_transformer(transformer, backend=backend, fullgraph=True, attention=[SDPBackend.MATH])
    assert is_compiled(transformer)
    _switch_loras_across_sizes(transformer, fuser, backend, SIZES)

    placeholders = [node for node in backend.graphs[0].graph.nodes if node.op == "placeholder"]
    assert any(isinstance(node.meta.get("example_value"), torch.SymInt) for node in placeholders), \
        "the token count should be a symbolic size in the graph"
    # batches of 2 to 4 share one more graph: see the warm-up test below


def test_fp8_weights_one_graph_for_every_size_and_lora():
    transformer, fuser = _fp8()
    backend = CountingBackend()
    compile_transformer(transformer, backend=backend, fullgraph=True)
    _switch_loras_across_sizes(transformer, fuser, backend, SIZES[:2])  # fp8 runs slowly on CPU; sizes are shown above


def test_attention_preference():
    assert attention_priority(torch.device("cpu")) is None
    hopper = attention_priority(torch.device("cuda"), capability=(9, 0))
    assert hopper[0] == SDPBackend.CUDNN_ATTENTION  # a preference: the others stay as fallbacks, in order
    assert hopper[1:] == [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for capability in [(8, 0), (8, 9), (10, 0), (12, 0)]:  # cuDNN is slower than flash on Ampere and Blackwell
        assert attention_priority(torch.device("cuda"), capability=capability) is None


def test_compile_only_on_cuda_unless_turned_off(monkeypatch):
    monkeypatch.delenv("FLUX_COMPILE", raising=False)
    assert not compile_wanted(torch.device("cpu"))
    assert compile_wanted(torch.device("cuda"))
    monkeypatch.setenv("FLUX_COMPILE", "0")
    assert not compile_wanted(torch.device("cuda"))


def test_warm_up_sizes_are_every_ratio_at_both_megapixels():
    sizes = warm_up_sizes()
    assert len(sizes) == 22 and (1024, 1024) in sizes and (512, 512) in sizes and (672, 384) in sizes


# --- warm-up through the real pipeline call ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipeline(tiny_weights):
    pipeline = FluxPipeline.from_pretrained(tiny_weights.dev, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def fresh_pipeline(tiny_pipeline):
    """The tiny pipeline with its transformer not compiled (each test compiles with its own counter)."""
    yield tiny_pipeline
    fast_compile.uncompile_transformer(tiny_pipeline.transformer)


TEXT_LENGTH = 64  # dev uses 512; any fixed length shows the same, and a short one is faster


def _request_like_generate(pipeline: FluxPipeline, width: int, height: int, images: int) -> None:
    """The transformer-facing part of FluxGenerator._denoise's call (flux/generate.py)."""
    with torch.inference_mode():
        pipeline(
            prompt="a photo of TOK", num_inference_steps=1, num_images_per_prompt=images,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in range(images)],
            max_sequence_length=TEXT_LENGTH, output_type="pil", width=width, height=height, guidance_scale=3.5,
        )


def test_compile_for_serving_warms_up_so_requests_compile_nothing(fresh_pipeline, monkeypatch, caplog):
    backend = CountingBackend()
    real_compile = fast_compile.compile_transformer
    # the device gate (tested above) says no on CPU; open it, and count instead of running inductor
    monkeypatch.setattr(fast_compile, "compile_wanted", lambda device: True)
    monkeypatch.setattr(fast_compile, "compile_transformer", lambda t, **kw: real_compile(t, backend=backend))
    monkeypatch.setattr(fast_compile, "warm_up_sizes", lambda: [(256, 256), (384, 256)])

    monkeypatch.setenv("FLUX_COMPILE_WARMUP", "0")
    assert compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8")
    assert is_compiled(fresh_pipeline.transformer) and backend.count == 0  # compiled lazily: nothing yet

    fast_compile.uncompile_transformer(fresh_pipeline.transformer)
    monkeypatch.delenv("FLUX_COMPILE_WARMUP")
    with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
        assert compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="dev-fp8")
    assert "dev-fp8: compiled and warmed up at 2 sizes" in caplog.text
    assert backend.count == 2  # the token-dynamic graph, then the batch-dynamic one

    # requests at sizes and batch sizes the warm-up did not use compile nothing more
    _request_like_generate(fresh_pipeline, 256, 384, images=1)
    _request_like_generate(fresh_pipeline, 320, 256, images=3)
    assert backend.count == 2


def test_a_compile_failure_at_warm_up_falls_back_to_eager(fresh_pipeline, monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor could not build a kernel")

    real_compile = fast_compile.compile_transformer
    monkeypatch.setattr(fast_compile, "compile_wanted", lambda device: True)
    monkeypatch.setattr(fast_compile, "compile_transformer", lambda t, **kw: real_compile(t, backend=broken_backend))
    monkeypatch.setattr(fast_compile, "warm_up_sizes", lambda: [(256, 256)])
    with caplog.at_level(logging.INFO, logger="flux.fast.compile"):
        assert not compile_for_serving(fresh_pipeline, max_sequence_length=TEXT_LENGTH, label="schnell-fp8")
    assert not is_compiled(fresh_pipeline.transformer)
    assert "running without compile" in caplog.text
    _request_like_generate(fresh_pipeline, 256, 256, images=1)  # serves eagerly


def test_a_background_warm_up_takes_turns_with_requests(fresh_pipeline):
    """Each warm-up call holds the pipelines' lock, so while a request holds it (flux/generate.py) the warm-up
    runs nothing: they share the scheduler, tokenizers and text encoders."""
    steps = []
    hook = fresh_pipeline.transformer.register_forward_hook(lambda *_: steps.append(1))
    lock = threading.Lock()
    try:
        with lock:  # a request is denoising
            warming = threading.Thread(
                target=fast_compile.warm_up, args=(fresh_pipeline, [(256, 256)]),
                kwargs=dict(max_sequence_length=TEXT_LENGTH, batch_sizes=(1,), exclusive=lock),
            )
            warming.start()
            time.sleep(0.5)
            assert warming.is_alive() and steps == []
        warming.join(timeout=60)
        assert not warming.is_alive() and len(steps) == 1
    finally:
        hook.remove()
