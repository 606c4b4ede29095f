"""go_fast's 8-bit kernels with a LoRA at FLUX.1's real shapes: each quantised layer carries the LoRA's change, and so
does the transformer's output, for every kernel (flux/fast/kernels.py: fp8 weight-only on CPU, fp8 x fp8 from
capability 8.9, int8 x int8 below). script/real_width_fp8 prints the same figures, for dequantise-add-requantise too.

The LoRA is rank 16 on every block Linear with a median ‖ΔW‖/‖W‖ of 3%, as real FLUX LoRAs. Per layer in bf16,
the GPU's dtype (the fused weight is rounded to bf16 before it is quantised, as on the GPU); the output in
float32, the CPU product's dtype, because one bf16 forward's own rounding moves the output more than such a LoRA
does (script/real_width_fp8 prints both), which would make a bf16 reference change mostly noise.
"""

from __future__ import annotations

import pytest
import torch

from flux.fast.quantize import is_quantised_linear, quantise_weight
from script._real_width_fp8 import (
    CONFIGS,
    OURS,
    fp8_copy,
    fusers,
    layer_strengths,
    median_delta_ratio,
    output_strengths,
    realistic_lora,
)
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


@pytest.mark.parametrize("kernel", CONFIGS)
def test_every_quantised_layer_carries_the_loras_change(real_width, lora, kernel, allow_gpu_config_on_cpu):
    """<dequant(W_q with LoRA) - dequant(W_q), ΔW> / |ΔW|² per layer: neither lost nor amplified."""
    bf16, config = real_width.transformer, CONFIGS[kernel]
    quantised = fp8_copy(bf16, config)
    strengths = layer_strengths(quantised, fusers(quantised, bf16, config, torch.bfloat16)[OURS], lora)
    assert len(strengths) == 20
    assert all(0.99 <= strength <= 1.01 for strength in strengths.values()), strengths


def test_the_cuda_configs_fp8_weights_are_the_cpu_configs(real_width, allow_gpu_config_on_cpu):
    """Float8DynamicActivationFloat8WeightConfig (CUDA >= 8.9, bf16) stores the same per-row fp8 weights as CPU's
    weight-only config, bit for bit, at every block shape: the per-layer strengths hold on the GPU too. (Its
    matmul needs a GPU; building its weights does not, so torchao's hardware check is lifted here.)"""
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


@pytest.mark.parametrize("kernel", ["weight-only (CPU)", "int8 (CUDA < 8.9)"])  # whose forward runs on CPU
def test_the_transformer_output_keeps_the_loras_strength(real_width, lora, kernel):
    """One forward at 256×256: <out_q_lora - out_q, out_lora - out> / |out_lora - out|² >= 0.95."""
    figures = output_strengths(real_width.transformer, [lora], methods=[OURS], config=CONFIGS[kernel])
    strength, _ = figures.strengths[0, OURS]
    assert strength >= 0.95, figures
