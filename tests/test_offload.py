"""flux/offload.py: blocks rest in (pinned) host memory and visit the execution device one at a time, for each
forward. The meta device stands in for the GPU: the same moves, no memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import get_module_execution_device
from torch import nn

from flux.offload import StreamedBlocks, stream_t5, t5_layers
from weights.pinned import PinnedArena

META = torch.device("meta")


def test_blocks_visit_the_device_for_each_forward_and_their_host_copies_stay_the_same():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    host_before = {name: t.detach().clone() for name, t in module.state_dict().items()}
    seen_during_forward = []
    StreamedBlocks(module, list(module), META)  # its hooks first: they install the block
    module[0].register_forward_pre_hook(lambda m, args: seen_during_forward.append(m.weight.device.type))

    output = module(torch.zeros(2, 8))  # inputs on the host: moved with the call

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
    StreamedBlocks(module, list(module), META)
    host = module.state_dict()
    assert len({t.untyped_storage().data_ptr() for t in host.values()}) == 1
    assert all(torch.equal(host[name], t) and host[name].dtype == t.dtype for name, t in before.items())


def test_t5_gets_its_prompt_ids_on_the_device_its_weights_visit(tiny_weights):
    """diffusers' encode_prompt sends T5's ids to get_module_execution_device(text_encoder_2): the host, where the
    weights wait between calls. The embedding must still see ids and weights on the same device."""
    pipeline = FluxPipeline.from_pretrained(tiny_weights.dev, dtype=torch.float32)
    t5 = pipeline.text_encoder_2
    seen = []
    t5.encoder.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append((args[0].device, m.weight.device)))
    stream_t5(t5, META)
    assert get_module_execution_device(t5).type == "meta"

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


def test_only_t5s_layers_are_copied_to_the_host_arena_and_the_tied_embedding_moves_once(monkeypatch):
    t5, copied = _tiny_t5(), []
    layer_bytes = sum(_distinct_bytes(layer) for layer in t5_layers(t5))
    real_copy = PinnedArena.copy

    def counting_copy(arena, tensor):
        copied.append(tensor.nbytes)
        return real_copy(arena, tensor)

    monkeypatch.setattr(PinnedArena, "copy", counting_copy)
    stream_t5(t5, META)
    assert sum(copied) == layer_bytes
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and t5.shared.weight.device == META


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_t5s_layers_visit_the_device_for_the_call_and_encode_the_same(device):
    t5, ids = _tiny_t5(), torch.tensor([[5, 9, 1, 0]])
    with torch.no_grad():
        expected = t5(ids).last_hidden_state
    during = []
    stream_t5(t5, torch.device(device))
    t5_layers(t5)[0].register_forward_pre_hook(
        lambda m, args: during.append(sorted({p.device.type for p in m.parameters()})))

    with torch.no_grad():
        output = t5(ids).last_hidden_state

    assert during == [[device]]
    assert all(p.device.type == "cpu" for layer in t5_layers(t5) for p in layer.parameters())
    if device == "cpu":  # meta has no values to compare
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
