"""flux/offload.py: a module waits on the host and visits the execution device only for its forward. The meta
device stands in for the GPU: the same moves, no memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import get_module_execution_device
from torch import nn

from flux.offload import offload_between_calls
from weights.pinned import PinnedArena

META = torch.device("meta")


def test_weights_visit_the_device_for_each_forward_and_the_host_copies_stay_the_same():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    host_before = {name: t.detach().clone() for name, t in module.state_dict().items()}
    seen_during_forward = []
    module[0].register_forward_pre_hook(lambda m, args: seen_during_forward.append(m.weight.device.type))
    offload_between_calls(module, META)

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


def test_an_error_inside_the_forward_still_sends_the_weights_back_to_the_host():
    """An OOM inside T5 must not leave its weights on the GPU until the next encode."""
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    def out_of_memory(_module, _args):
        assert module[0].weight.device.type == "meta"  # raised while the weights are on the device
        raise RuntimeError("CUDA out of memory")

    module[1].register_forward_pre_hook(out_of_memory)
    offload_between_calls(module, META)
    with pytest.raises(RuntimeError, match="out of memory"):
        module(torch.zeros(2, 8, device="meta"))
    assert all(t.device.type == "cpu" for t in module.state_dict().values())


def test_t5_gets_its_prompt_ids_on_the_device_its_weights_visit(tiny_weights):
    """diffusers' encode_prompt sends T5's ids to get_module_execution_device(text_encoder_2): the host, where the
    weights wait between calls. The embedding must still see ids and weights on the same device."""
    pipeline = FluxPipeline.from_pretrained(tiny_weights.dev, dtype=torch.float32)
    t5 = pipeline.text_encoder_2
    seen = []
    t5.encoder.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append((args[0].device, m.weight.device)))
    offload_between_calls(t5, META)
    assert get_module_execution_device(t5).type == "cpu"

    prompt_embeds, _, _ = pipeline.encode_prompt(prompt="a photo", prompt_2=None, device=META, max_sequence_length=64)

    assert seen == [(META, META)]
    assert prompt_embeds.device == META and prompt_embeds.shape == (1, 64, t5.config.d_model)


def _tiny_t5() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, is_encoder_decoder=False,
                      feed_forward_proj="gated-gelu", use_cache=False)
    t5 = T5EncoderModel(config).eval()
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # transformers ties them: one tensor, two names
    return t5


def _distinct_bytes(module: nn.Module) -> int:
    """Bytes of the module's distinct tensors (parameters() and buffers() list a shared tensor once)."""
    return sum(tensor.nbytes for tensor in [*module.parameters(), *module.buffers()])


def test_t5s_tied_embedding_is_pinned_once(monkeypatch):
    t5 = _tiny_t5()
    total, copied = _distinct_bytes(t5), []
    real_copy = PinnedArena.copy

    def counting_copy(arena, tensor):
        copied.append(tensor.nbytes)
        return real_copy(arena, tensor)

    monkeypatch.setattr(PinnedArena, "copy", counting_copy)
    offload_between_calls(t5, META)  # host copies now; nothing goes to the device before a forward
    assert sum(copied) == total and t5.shared.weight is t5.encoder.embed_tokens.weight


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_t5s_tied_embedding_is_copied_once_per_call_and_stays_tied(device):
    t5, ids = _tiny_t5(), torch.tensor([[5, 9, 1, 0]])
    with torch.no_grad():
        expected = t5(ids).last_hidden_state
    total, during = _distinct_bytes(t5), []
    t5.encoder.embed_tokens.register_forward_pre_hook(
        lambda m, args: during.append((t5.shared.weight is m.weight, m.weight.device.type, _distinct_bytes(t5))))
    offload_between_calls(t5, torch.device(device))

    with torch.no_grad():
        output = t5(ids).last_hidden_state

    assert during == [(True, device, total)]  # one copy of the embedding on the device, under both names
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and t5.shared.weight.device.type == "cpu"
    if device == "cpu":  # meta has no values to compare
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
