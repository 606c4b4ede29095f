"""go_fast's fp8 with a LoRA at FLUX.1's real shapes: each fp8 layer carries the LoRA's change, and so does the
transformer's output. bench/real_width_fp8 prints the same figures, for dequantise-add-requantise too.

The LoRA is rank 16 on every block Linear with a median ‖ΔW‖/‖W‖ of 3%, as real FLUX LoRAs. Per layer in bf16,
the GPU's dtype (the fused weight is rounded to bf16 before it is quantised, as on the GPU); the output in
float32, the CPU product's dtype, because one bf16 forward's own rounding moves the output more than such a LoRA
does (bench/real_width_fp8 prints both), which would make a bf16 reference change mostly noise.
"""

from __future__ import annotations

import pytest
import torch

from bench._real_width_fp8 import (
    CONFIGS,
    OURS,
    fp8_copy,
    fusers,
    layer_strengths,
    median_delta_ratio,
    output_strengths,
    realistic_lora,
)
from flux.fast.quantize import is_quantised_linear, quantise_weight
from tests.fixtures.real_width import real_width_fixture  # noqa: F401 (provides real_width)

pytestmark = pytest.mark.real_width

WEIGHT_ONLY = CONFIGS["weight-only (CPU)"]


@pytest.fixture(scope="module")
def lora(real_width):
    return realistic_lora(real_width.transformer)


def test_the_lora_is_realistic(real_width, lora):
    block_linears = [name for name, module in real_width.transformer.named_modules() if is_quantised_linear(name, module)]
    assert sorted(lora.deltas) == sorted(f"transformer.{name}" for name in block_linears) and len(lora.deltas) == 20
    assert all(delta.down.shape[0] == 16 for delta in lora.deltas.values())
    assert 0.028 < median_delta_ratio(lora, real_width.transformer) < 0.032


def test_every_fp8_layer_carries_the_loras_change(real_width, lora):
    """<dequant(W_fp8 with LoRA) - dequant(W_fp8), ΔW> / |ΔW|² per layer: neither lost nor amplified."""
    bf16 = real_width.transformer
    fp8 = fp8_copy(bf16, WEIGHT_ONLY)
    strengths = layer_strengths(fp8, fusers(fp8, bf16, WEIGHT_ONLY, torch.bfloat16)[OURS], lora)
    assert len(strengths) == 20
    assert all(0.99 <= strength <= 1.01 for strength in strengths.values()), strengths


def test_the_cuda_configs_fp8_weights_are_the_cpu_configs(real_width, monkeypatch):
    """Float8DynamicActivationFloat8WeightConfig (CUDA >= 8.9, bf16) stores the same per-row fp8 weights as CPU's
    weight-only config, bit for bit, at every block shape: the per-layer strengths hold on the GPU too. (Its
    matmul needs a GPU; building its weights does not, so torchao's hardware check is lifted here.)"""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    cuda_config = CONFIGS["dynamic-activation (CUDA)"]
    one_per_shape = {}
    for name, module in real_width.transformer.named_modules():
        if is_quantised_linear(name, module):
            one_per_shape.setdefault(tuple(module.weight.shape), module.weight.detach())
    assert len(one_per_shape) == 6
    for shape, weight in one_per_shape.items():
        cpu, cuda = quantise_weight(weight, WEIGHT_ONLY), quantise_weight(weight, cuda_config)
        assert torch.equal(cpu.qdata.view(torch.uint8), cuda.qdata.view(torch.uint8)), shape
        assert torch.equal(cpu.scale, cuda.scale), shape


def test_the_transformer_output_keeps_the_loras_strength(real_width, lora):
    """One forward at 256×256: <out_fp8_lora - out_fp8, out_lora - out> / |out_lora - out|² >= 0.95."""
    figures = output_strengths(real_width.transformer, [lora], methods=[OURS])
    strength, _ = figures.strengths[0, OURS]
    assert strength >= 0.95, figures
