"""A module that waits in pinned host memory and visits the GPU for each call (T5 on small GPUs).

The memory plan (flux/fast/memory.py) puts T5 XXL (8.9 GiB in bf16) in host memory where a class would not fit
beside it, e.g. FastPredictor on a 24 GiB GPU. T5 runs once per request, to encode the prompt, so its weights are
copied to the GPU right before that forward (over pinned PCIe, about 0.4 s at 25 GB/s) and the GPU copies are
dropped right after: nothing is copied back, since T5's weights never change (no LoRA touches it). Unlike
accelerate's CPU offload hooks, the host copies are pinned once and kept, so no call allocates host memory.
"""

from __future__ import annotations

import torch
from torch import nn

from weights.pinned import PinnedArena


def offload_between_calls(module: nn.Module, device: torch.device) -> nn.Module:
    """Keep `module` (on the CPU) in pinned host memory, on `device` only during each forward. Returns it."""
    # views of a few large pinned slabs: pinned one by one, each would be rounded up to a power of two (+37%)
    host_copies = PinnedArena(pin=device.type == "cuda") if device.type != "cpu" else None
    slots = []  # (a module's parameters or buffers dict, name, the host tensor, whether a parameter)
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    host = host_copies.copy(tensor) if host_copies is not None else tensor.detach()
                    slots.append((table, name, host, isinstance(tensor, nn.Parameter)))

    def place(on_device: bool) -> None:
        for table, name, host, is_parameter in slots:
            tensor = host.to(device, non_blocking=True) if on_device else host
            table[name] = nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor

    place(on_device=False)
    module.register_forward_pre_hook(lambda _module, _args: place(on_device=True))
    module.register_forward_hook(lambda _module, _args, _output: place(on_device=False))
    return module
