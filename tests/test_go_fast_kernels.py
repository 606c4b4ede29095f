"""go_fast's kernel per GPU generation (flux/fast/kernels.py): the choice for every card people run this on, that no
GPU gets a weight-only kernel (slower than bf16), what each kernel's weights weigh, and the int8 kernel through
the product on CPU (build, LoRA, exact restore, quality)."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    PerRow,
    PerTensor,
)

from flux.fast.kernels import generation, go_fast_kernel, kernel_for
from flux.fast.quantize import is_quantised, quantise_weight

BF16, FP32 = torch.bfloat16, torch.float32
FP8, INT8 = "fp8 weights x fp8 activations", "int8 weights x int8 activations"
# card: (compute capability, generation, go_fast's kernel)
CARDS = {
    "T4": ((7, 5), "Turing", INT8),
    "A100": ((8, 0), "Ampere", INT8),
    "A10G": ((8, 6), "Ampere", INT8),
    "RTX 3090": ((8, 6), "Ampere", INT8),
    "A6000": ((8, 6), "Ampere", INT8),
    "L4": ((8, 9), "Ada", FP8),
    "RTX 4080": ((8, 9), "Ada", FP8),
    "RTX 4090": ((8, 9), "Ada", FP8),
    "L40S": ((8, 9), "Ada", FP8),
    "H100": ((9, 0), "Hopper", FP8),
    "H200": ((9, 0), "Hopper", FP8),
    "B200": ((10, 0), "Blackwell", FP8),
}
EVERY_CAPABILITY = [(7, 0), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0)]


@pytest.mark.parametrize("card", CARDS)
def test_every_card_gets_its_generations_kernel(card):
    capability, name, expected = CARDS[card]
    kernel = kernel_for(capability, BF16)
    assert generation(capability) == name and kernel.why.startswith(name)
    assert kernel.name == expected
    if expected == FP8:
        assert isinstance(kernel.config, Float8DynamicActivationFloat8WeightConfig)
        assert all(isinstance(g, PerRow) for g in kernel.config.granularity)  # per-row scales, bf16 operands
        assert kernel.inductor_options == {}
    else:
        assert isinstance(kernel.config, Int8DynamicActivationInt8WeightConfig)
        assert kernel.inductor_options == {"force_fuse_int_mm_with_mul": True}
    assert kernel.config.set_inductor_config is False  # nothing process-wide (flux/fast/compile.py decides)


def test_the_cpu_keeps_weight_only_fp8_so_the_gpu_code_path_is_testable():
    kernel = kernel_for(None, FP32)
    assert isinstance(kernel.config, Float8WeightOnlyConfig) and kernel.name == "fp8 weights only"
    assert go_fast_kernel(torch.device("cpu"), FP32) == kernel


def test_a_float32_model_on_an_fp8_gpu_gets_one_scale_per_tensor():
    """torchao's per-row fp8 matmul takes bf16 operands only (FLUX_DTYPE=fp32 on a GPU)."""
    kernel = kernel_for((9, 0), FP32)
    assert all(isinstance(g, PerTensor) for g in kernel.config.granularity)
    assert (kernel.bytes_per_row, kernel.bytes_per_tensor) == (0, 4)


def test_the_device_decides_through_its_compute_capability(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (8, 6))
    assert go_fast_kernel(torch.device("cuda"), BF16).name == INT8
    assert asked == [torch.device("cuda")]


@pytest.mark.parametrize("capability", EVERY_CAPABILITY, ids=str)
def test_no_gpu_gets_a_weight_only_kernel(capability, allow_gpu_config_on_cpu):
    """Weight-only dequantises every weight at every step, then multiplies in bf16: slower than bf16 by design.
    Every GPU kernel's weight carries the activation quantisation its matmul applies."""
    weight = quantise_weight(torch.randn(64, 64, dtype=BF16), kernel_for(capability, BF16).config)
    assert is_quantised(weight) and weight.act_quant_kwargs is not None


def _inner_bytes(weight: torch.Tensor) -> int:
    inner, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, name).nbytes for name in inner)


@pytest.mark.parametrize(("capability", "dtype"), [(None, FP32), (None, BF16), ((8, 6), BF16), ((8, 6), FP32),
                                                    ((9, 0), BF16), ((9, 0), FP32)], ids=str)
def test_each_kernels_bytes_are_what_torchao_stores(capability, dtype, allow_gpu_config_on_cpu):
    """The memory plan counts kernel.weight_bytes (flux/fast/sizes.py): data, scales and int8's zero points."""
    kernel = kernel_for(capability, dtype)
    for rows, columns in [(3072, 3072), (12288, 3072), (3072, 15360)]:
        weight = quantise_weight(torch.randn(rows, columns, dtype=dtype), kernel.config)
        assert _inner_bytes(weight) == kernel.weight_bytes(rows, columns)


# --- the int8 kernel through the product, on CPU -----------------------------------------------------------------

@pytest.fixture
def int8_pipelines(tiny_weights):
    """dev in the model dtype and in go_fast's Ampere kernel (int8 x int8), which torchao also runs on CPU. Fresh
    for each test: the quality figures' dequantise-add-requantise fuser leaves other bits than the build's."""
    from flux.pipelines import FluxPipelines
    from flux.variants import Variant
    from weights.store import WeightsFolder

    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    return FluxPipelines(store, torch.device("cpu"), FP32, resident=(Variant("dev"), Variant("dev", "fp8")),
                         go_fast=kernel_for((8, 6), FP32))


def test_the_product_builds_go_fast_in_the_kernel_it_is_given(int8_pipelines):
    from flux.fast.quantize import is_quantised_linear

    transformer = int8_pipelines.transformer("dev-fp8")
    blocks = [module for name, module in transformer.named_modules() if is_quantised_linear(name, module)]
    assert blocks and all(type(module.weight).__name__ == "Int8Tensor" for module in blocks)
    assert not is_quantised(transformer.proj_out.weight)


def test_go_fast_int8_keeps_a_typical_loras_strength_and_stays_close_to_bf16(int8_pipelines, tmp_path):
    """The figures bench/_go_fast_quality.py prints, with int8 activations really computed (torchao runs them on
    CPU): the LoRA's effect on the image at full strength, and the image close to the model dtype's."""
    from bench._go_fast_quality import measure_quality, typical_lora

    lora = typical_lora(int8_pipelines.transformer("dev-bf16"), tmp_path)
    quality = measure_quality(int8_pipelines, lora, size=256, steps=1)
    assert 0.9 <= quality.strength <= 1.1
    assert quality.psnr_without_lora > 60 and quality.psnr_with_lora > 60  # measured 78 dB (CPU fp8 weight-only: 67)


def test_lora_state_fuses_on_int8_and_restores_the_build(int8_pipelines, tmp_path, monkeypatch):
    from flux.lora_state import LoraState
    from flux.request import build_request
    from flux.variants import Variant
    from tests.fixtures.lora_factory import make_spec, write_layout

    transformer = int8_pipelines.transformer("dev-fp8")
    to_q = transformer.transformer_blocks[0].attn.to_q.weight
    before = to_q.qdata.clone(), to_q.scale.clone()  # as built
    bf16 = int8_pipelines.transformer("dev")
    lora = write_layout("diffusers", make_spec(bf16, seed=5, magnitude=0.3), bf16, tmp_path / "lora.safetensors")
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path))
    state = LoraState(int8_pipelines)
    state.prepare(build_request(prompt="x", go_fast=True, extra_lora=str(lora)), Variant("dev", "fp8"))
    assert not torch.equal(to_q.qdata, before[0])
    state.prepare(build_request(prompt="x", go_fast=True), Variant("dev", "fp8"))
    assert transformer.transformer_blocks[0].attn.to_q.weight is to_q  # in place: compiled graphs stay valid
    assert torch.equal(to_q.qdata, before[0]) and torch.equal(to_q.scale, before[1])


def test_the_memory_plan_counts_int8_by_its_kernel():
    from flux.fast.quantize import is_quantised_linear
    from flux.fast.sizes import module_bytes
    from weights.tiny.flux import tiny_transformer

    transformer = tiny_transformer(guidance_embeds=True)
    rows = sum(m.weight.shape[0] for name, m in transformer.named_modules() if is_quantised_linear(name, m))
    int8 = module_bytes(transformer, 2, quantised=is_quantised_linear, kernel=kernel_for((8, 6), BF16))
    fp8 = module_bytes(transformer, 2, quantised=is_quantised_linear, kernel=kernel_for((9, 0), BF16))
    assert int8 - fp8 == rows  # one int8 zero point per row more
    assert module_bytes(transformer, 2, quantised=is_quantised_linear) == fp8  # without a GPU: the H100's
