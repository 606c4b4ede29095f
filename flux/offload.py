"""A module that waits in pinned host memory and visits the GPU for each call (T5 on small GPUs).

The memory plan (flux/fast/memory.py) puts T5 XXL (8.9 GiB in bf16) in host memory where a class would not fit
beside it, e.g. FastPredictor on a 24 GiB GPU. T5 runs once per request, to encode the prompt, so its weights are
copied to the GPU right before that forward (over pinned PCIe, about 0.4 s at 25 GB/s) and the GPU copies are
dropped right after, even when the forward raises (an OOM must not leave 8.9 GiB behind): nothing is copied back,
since T5's weights never change (no LoRA touches it). Unlike accelerate's CPU offload hooks, the host copies are
pinned once and kept, so no call allocates host memory.

- **Inputs.** diffusers sends a text encoder's inputs to `get_module_execution_device`, which is where the weights
  are (the host) for a module without an accelerate hook, so the pre-hook moves tensor arguments to the device too.
- **Tied tensors.** A tensor held under several names (T5's embedding: `shared` and `encoder.embed_tokens` in
  transformers 5) is pinned once and copied once per call, and every name gets the same copy, so the tie holds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from weights.pinned import PinnedArena


def offload_between_calls(module: nn.Module, device: torch.device) -> nn.Module:
    """Keep `module` (on the CPU) in pinned host memory, on `device` only during each forward. Returns it."""
    # views of a few large pinned slabs: pinned one by one, each would be rounded up to a power of two (+37%)
    host_copies = PinnedArena(pin=device.type == "cuda") if device.type != "cpu" else None
    hosts: list[tuple[torch.Tensor, bool]] = []  # each distinct tensor's host copy, and whether it is a parameter
    index_of: dict[int, int] = {}  # id of an original tensor -> its place in hosts (tied weights are copied once)
    slots: list[tuple[dict, str, int]] = []  # (a module's parameters or buffers dict, name, place in hosts)
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                if id(tensor) not in index_of:
                    index_of[id(tensor)] = len(hosts)
                    host = host_copies.copy(tensor) if host_copies is not None else tensor.detach()
                    hosts.append((host, isinstance(tensor, nn.Parameter)))
                slots.append((table, name, index_of[id(tensor)]))

    def place(on_device: bool) -> None:
        tensors = [(host.to(device, non_blocking=True) if on_device else host, is_parameter) for host, is_parameter in hosts]
        placed = [nn.Parameter(tensor, requires_grad=False) if is_parameter else tensor for tensor, is_parameter in tensors]
        for table, name, index in slots:
            table[name] = placed[index]

    def to_device(value: object) -> object:
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        place(on_device=True)
        return tree_map(to_device, args), tree_map(to_device, kwargs)

    place(on_device=False)
    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(lambda _module, _args, _output: place(on_device=False), always_call=True)
    return module
