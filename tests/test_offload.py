"""flux/offload.py: a module waits on the host and visits the execution device only for its forward."""

from __future__ import annotations

import torch
from torch import nn

from flux.offload import offload_between_calls


def test_weights_visit_the_device_for_each_forward_and_the_host_copies_stay_the_same():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    host_before = {name: t.detach().clone() for name, t in module.state_dict().items()}
    seen_during_forward = []
    module[0].register_forward_pre_hook(lambda m, args: seen_during_forward.append(m.weight.device.type))
    offload_between_calls(module, torch.device("meta"))  # meta stands in for the GPU: the same moves, no memory

    output = module(torch.zeros(2, 8, device="meta"))

    assert output.device.type == "meta" and seen_during_forward == ["meta"]
    assert all(t.device.type == "cpu" for t in module.state_dict().values())  # back on the host after the call
    assert all(torch.equal(module.state_dict()[name], t) for name, t in host_before.items())
    module(torch.zeros(2, 8, device="meta"))
    assert seen_during_forward == ["meta", "meta"]  # every call, not only the first
