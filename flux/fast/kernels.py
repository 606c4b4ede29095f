"""go_fast's kernel on each GPU generation: one function of the compute capability, `kernel_for`.

go_fast stores the transformer blocks' Linear weights in 8 bits and compiles the blocks (flux/fast/compile.py).
What makes it fast is the matmul: both operands in 8 bits, on tensor cores that multiply them at twice the bf16
rate or more. A weight-only 8-bit format saves memory but is slower than bf16 on every GPU: each step
dequantises every weight (1 byte read, 2 written, 2 read again by the bf16 matmul: 36 GB more traffic than bf16
per step for FLUX's 12 G weights) and then multiplies in bf16. So on CUDA go_fast always quantises the
activations too, in the 8-bit format the card's tensor cores multiply fastest:

- 8.9 and up (Ada, Hopper, Blackwell): fp8 weights x fp8 activations, per-row scales (per-tensor for a float32
  model: torchao's per-row fp8 matmul takes bf16 only). Blackwell (10.0, 12.0) runs the same config through
  torchao's per-row fp8 matmul (mslk where installed, else torch._scaled_mm); NVFP4 (torchao's prototype
  NVFP4DynamicActivationNVFP4WeightConfig) would be one more entry here.
- below 8.9 (Ampere 8.0/8.6/8.7, Turing 7.5): no fp8 tensor cores. int8 weights (per row) x int8 activations
  (per token): Ampere's int8 tensor cores run at twice its bf16 rate (4x on GeForce RTX 30). Turing has no bf16
  tensor cores (bf16 runs on its CUDA cores) and FLUX overflows in fp16, so int8 is its one usable tensor-core
  path; whether a Turing card is served at all is the setup's decision, not this module's.
- CPU: fp8 weights only, so the same build, LoRA and memory code runs in the tests; CPU speed is not the point.

int8 and fp8 weights weigh the same in the memory plan (1 byte per weight, float32 scales per row; int8 adds an
int8 zero point per row). docs/go-fast.md has the published FLUX figures behind these choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    PerRow,
    PerTensor,
)

Capability = tuple[int, int]
FP8_TENSOR_CORES: Capability = (8, 9)  # Ada and everything after
GENERATIONS: dict[Capability, str] = {(7, 5): "Turing", (8, 0): "Ampere", (8, 9): "Ada", (9, 0): "Hopper",
                                      (10, 0): "Blackwell"}  # each from its capability up to the next
# Inductor fuses the int8 matmul with its per-token scale instead of writing the int32 result out and reading it
# back (torchao's recommended setting for int8, which set_inductor_config=False no longer sets process-wide)
INT8_INDUCTOR_OPTIONS = {"force_fuse_int_mm_with_mul": True}


@dataclass(frozen=True)
class GoFastKernel:
    """What go_fast quantises the block Linears with on one device, and what that weighs."""

    name: str  # for logs: "int8 weights x int8 activations"
    config: AOBaseConfig  # torchao's quantize_ config for each block Linear (set_inductor_config=False)
    why: str  # one clause for setup's log
    bytes_per_row: int  # float32 scale per output row (+ an int8 zero point for int8); 0 with one scale per tensor
    bytes_per_tensor: int = 0
    inductor_options: dict = field(default_factory=dict)  # for these graphs only (compile_transformer options)

    @property
    def precision(self) -> str:
        """What the weights are stored in, for image metadata: "fp8" or "int8"."""
        return self.name.split()[0]

    def weight_bytes(self, rows: int, columns: int) -> int:
        """Bytes of one quantised Linear weight of this shape: 1 byte per element plus its scales."""
        return rows * columns + rows * self.bytes_per_row + self.bytes_per_tensor


def generation(capability: Capability) -> str:
    """"Ampere" for (8, 6): the newest generation whose first capability is at most this one."""
    return next((name for first, name in sorted(GENERATIONS.items(), reverse=True) if capability >= first), "pre-Turing")


def kernel_for(capability: Capability | None, dtype: torch.dtype) -> GoFastKernel:
    """go_fast's kernel on a CUDA GPU of this compute capability, or on the CPU (None); dtype: the model's.

    set_inductor_config=False everywhere: by default every quantize_ call (at build and after each LoRA fuse) would
    set process-wide Inductor options; flux/fast/compile.py decides what its own compile uses, for its graphs only."""
    if capability is None:
        return GoFastKernel("fp8 weights only", Float8WeightOnlyConfig(granularity=PerRow(), set_inductor_config=False),
                            "CPU: the GPU code path, testable; dequantised to the model dtype for each matmul",
                            bytes_per_row=4)
    name = generation(capability)
    if capability >= FP8_TENSOR_CORES:
        per_row = dtype == torch.bfloat16  # torchao's per-row fp8 matmul takes bf16 operands only
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if per_row else PerTensor(),
                                                           set_inductor_config=False)
        return GoFastKernel("fp8 weights x fp8 activations", config,
                            f"{name}: fp8 tensor cores multiply at twice the bf16 rate",
                            bytes_per_row=4 if per_row else 0, bytes_per_tensor=0 if per_row else 4)
    why = ("no fp8 tensor cores; int8 ones multiply at twice the bf16 rate (4x on GeForce)" if capability >= (8, 0)
           else "no bf16 tensor cores (bf16 runs on CUDA cores); int8 is its fastest matmul")
    return GoFastKernel("int8 weights x int8 activations", Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
                        f"{name}: {why}", bytes_per_row=5, inductor_options=dict(INT8_INDUCTOR_OPTIONS))


def go_fast_kernel(device: torch.device, dtype: torch.dtype) -> GoFastKernel:
    """kernel_for this device: its compute capability on CUDA, the CPU's kernel elsewhere."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return kernel_for(capability, dtype)
