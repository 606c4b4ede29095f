"""The CUDA cards people run FLUX.1 on: name, compute capability, and total memory as torch reports it.

`total_bytes` is `torch.cuda.get_device_properties(0).total_memory` on that card, which is less than the size it is
sold as (an "80 GB" A100 reports 79.15 GiB): the figures are those torch prints in its out-of-memory messages on each
card ("GPU 0 has a total capacity of ..."), rounded to the MiB, not measured here. Pure data, no torch: the memory
plan, the simulated GPU (tests/fixtures/simulated_gpu) and the choice of go_fast's kernel per card all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from units import GiB, MiB


@dataclass(frozen=True)
class Card:
    name: str  # as torch.cuda.get_device_name() says it
    capability: tuple[int, int]  # torch.cuda.get_device_capability()
    total_bytes: int  # torch.cuda.get_device_properties().total_memory
    short: str  # the name people use, for tables and test ids

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def __str__(self) -> str:
        return f"{self.short} ({self.total_gib:.1f} GiB, {self.capability[0]}.{self.capability[1]})"


def _card(short: str, name: str, capability: tuple[int, int], gib: float) -> Card:
    return Card(name, capability, round(gib * GiB / MiB) * MiB, short)


CARDS = (
    _card("T4", "Tesla T4", (7, 5), 14.75),
    _card("RTX 4080", "NVIDIA GeForce RTX 4080", (8, 9), 15.70),
    _card("A10G", "NVIDIA A10G", (8, 6), 22.49),
    _card("L4", "NVIDIA L4", (8, 9), 22.48),
    _card("RTX 3090", "NVIDIA GeForce RTX 3090", (8, 6), 23.69),
    _card("RTX 4090", "NVIDIA GeForce RTX 4090", (8, 9), 23.65),
    _card("A100 40GB", "NVIDIA A100-SXM4-40GB", (8, 0), 39.39),
    _card("L40S", "NVIDIA L40S", (8, 9), 44.52),
    _card("A6000", "NVIDIA RTX A6000", (8, 6), 47.53),
    _card("A100 80GB", "NVIDIA A100-SXM4-80GB", (8, 0), 79.15),
    _card("H100", "NVIDIA H100 80GB HBM3", (9, 0), 79.60),
    _card("H200", "NVIDIA H200", (9, 0), 139.81),
    _card("B200", "NVIDIA B200", (10, 0), 178.35),
)


BF16_TENSOR_CORES = (8, 0)  # Ampere and newer


class GpuCannotServe(RuntimeError):
    """Setup refuses this GPU: an operator's problem, not a request's (so no errors.UserError). The message is one
    sentence naming the card, what FLUX.1 needs and what would do."""


def card_refusal(name: str, capability: tuple[int, int], total_bytes: int) -> str | None:
    """Why this card cannot serve FLUX.1, or None. Below compute capability 8.0 (T4, V100) bf16 has no tensor
    cores: a 1 MP dev step is about 125 TFLOP, over 15 s on a T4's 8.1 TFLOPS of fp32 CUDA cores; and FLUX overflows in
    float16, so its fp16 tensor cores are no way round. The memory plan judges the size (flux/fast/memory.py)."""
    if capability >= BF16_TENSOR_CORES:
        return None
    return (
        f"The {name} (compute capability {capability[0]}.{capability[1]}, {total_bytes / GiB:.2f} GiB) cannot serve "
        "FLUX.1: it has no bfloat16 tensor cores (a 1-megapixel dev step would take over 15 s, 7 minutes an "
        "image) and FLUX overflows in float16; use a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, "
        "Blackwell) with at least 16 GB."
    )


def card(short: str) -> Card:
    """The card of CARDS named `short` ("H100", "RTX 4090"...)."""
    for item in CARDS:
        if item.short == short:
            return item
    raise KeyError(f"no card {short!r}; known: {', '.join(item.short for item in CARDS)}")
