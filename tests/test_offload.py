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


def test_the_host_copies_are_views_of_one_slab_not_a_block_each():
    """Pinned one by one, torch's caching host allocator would round each tensor up to a power of two
    (weights/pinned.py): T5's 8.9 GiB would take 12.3."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    before = {name: t.detach().clone() for name, t in module.state_dict().items()}
    offload_between_calls(module, torch.device("meta"))
    host = module.state_dict()
    assert len({t.untyped_storage().data_ptr() for t in host.values()}) == 1
    assert all(torch.equal(host[name], t) and host[name].dtype == t.dtype for name, t in before.items())
