"""Model blocks that wait in pinned host memory and visit the GPU one at a time, the next copied while this one runs.

Where the GPU memory plan (flux/fast/memory.py) has no room for a whole model, the blocks that do not fit stream:
T5 XXL's 24 layers whenever T5 is not resident, and the transformer blocks that do not fit beside the rest on a
16-24 GiB card. A streamed block's tensors rest in pinned slabs (weights/pinned.py) and are on the GPU only for
its forward:

- **Prefetch.** When a streamed block starts, the copy of the next streamed block is issued on a side CUDA stream,
  so it crosses the host link while this block computes; a block waits only for its own copy. The first streamed
  block's copy starts with the model's forward. At most two streamed blocks are on the GPU at once. A forward
  takes about max(compute, streamed bytes / link speed) when the streamed blocks are spread among resident ones
  (the memory plan's `spread`).
- **Memory.** A block's device tensors are made on the copy stream and read on the compute stream: record_stream
  keeps the caching allocator from lending their memory to the next copy before the compute stream is done.
- **Exact.** The same tensors, copied: streaming changes no value. A LoRA is fused into the host copies, computed
  on the GPU (lora/apply.py `compute_device`), so what streams is already fused and nothing is copied back.
- **Failure.** A forward that raises still drops every device copy (always_call hooks): an OOM leaves nothing.
- **Inputs.** diffusers sends a text encoder's inputs to `get_module_execution_device`, the device of its first
  tensor, which may rest on the host; the model's pre-hook moves tensor arguments to the device.
- **Tied and quantised tensors.** A tensor held under two names is copied once and stays tied; a torchao tensor
  subclass (go_fast's 8-bit weights) rests as its inner tensors and is rebuilt on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_map

from weights.pinned import PinnedArena


def to_arena(tensor: Tensor, arena: PinnedArena) -> Tensor:
    """`tensor` copied into the arena (a subclass as its inner tensors), unless it is there already; e.g. as a
    transformer is built, so that its streamed blocks never exist whole on the GPU nor twice on the host."""
    parts = _parts(tensor)
    if all(arena.holds(part) for part in parts):
        return tensor
    return _HostCopy(tensor, arena).host


def _parts(tensor: Tensor) -> list[Tensor]:
    if is_traceable_wrapper_subclass(tensor):
        return [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
    return [tensor]


class _HostCopy:
    """One tensor's exact copy in the arena (no new copy of what is there already): a plain tensor, or a tensor
    subclass's inner tensors."""

    def __init__(self, tensor: Tensor, arena: PinnedArena):
        self.is_parameter = isinstance(tensor, nn.Parameter)
        tensor = tensor.detach()
        self._names: list[str] | None = None
        if is_traceable_wrapper_subclass(tensor):
            self._names, self._context = tensor.__tensor_flatten__()
            self._type, self._size, self._stride = type(tensor), tensor.size(), tensor.stride()
        self.parts = [part if arena.holds(part) else arena.copy(part) for part in _parts(tensor)]
        self.host = self._rebuilt(self.parts)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def _rebuilt(self, parts: list[Tensor]) -> Tensor:
        if self._names is None:
            return parts[0]
        inner = dict(zip(self._names, parts, strict=True))
        return self._type.__tensor_unflatten__(inner, self._context, self._size, self._stride)

    def on(self, device: torch.device) -> tuple[Tensor, list[Tensor]]:
        """The tensor on `device` (a copy issued without blocking), and its plain parts there."""
        parts = [part.to(device, non_blocking=True) for part in self.parts]
        return self._rebuilt(parts), parts


class _HostBlock:
    """A module whose tensors (its own and its children's) rest in the arena between forwards."""

    def __init__(self, module: nn.Module, arena: PinnedArena):
        self.module = module
        self.copies: list[_HostCopy] = []
        index_of: dict[int, int] = {}  # id of a tensor -> its copy (tied tensors are copied once)
        self._slots: list[tuple[dict, str, int]] = []  # (a parameters or buffers table, name, copy)
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in index_of:
                        index_of[id(tensor)] = len(self.copies)
                        self.copies.append(_HostCopy(tensor, arena))
                    self._slots.append((table, name, index_of[id(tensor)]))
        self._resting = [nn.Parameter(copy.host, requires_grad=False) if copy.is_parameter else copy.host
                         for copy in self.copies]
        self.rest()

    @property
    def nbytes(self) -> int:
        return sum(copy.nbytes for copy in self.copies)

    def install(self, tensors: Sequence[Tensor]) -> None:
        """The block's tensors become these (device copies, as plain tensors: made under the request's
        inference_mode, they cannot become Parameters)."""
        for table, name, index in self._slots:
            table[name] = tensors[index]

    def rest(self) -> None:
        """Its tensors back to the host copies (a LoRA fuser writes into these), as the Parameters made when the
        block was set up: one made now, under inference_mode, would be an inference tensor the fuser cannot write."""
        self.install(self._resting)


class _Copier:
    """Host-to-device copies: on a side stream with an event per copy on CUDA, plain copies elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def issue(self, block: _HostBlock) -> tuple[list[Tensor], list[Tensor], object]:
        """(device tensors, their plain parts, the event that says they have arrived) for `block`."""
        if self._stream is None:
            moved = [copy.on(self.device) for copy in block.copies]
            return [tensor for tensor, _ in moved], [part for _, parts in moved for part in parts], None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the host copies may just have been fused
        with torch.cuda.stream(self._stream):
            moved = [copy.on(self.device) for copy in block.copies]
            arrived = torch.cuda.Event()
            arrived.record(self._stream)
        return [tensor for tensor, _ in moved], [part for _, parts in moved for part in parts], arrived

    def wait(self, parts: list[Tensor], arrived: object) -> None:
        """Make the compute stream wait for a block's copy, and keep its memory until the compute stream is done."""
        if arrived is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(arrived)
        for part in parts:
            part.record_stream(compute)


class StreamedBlocks:
    """`blocks` of `model` rest in pinned host memory and stream to `device` for each forward (module doc)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], device: torch.device,
                 arena: PinnedArena | None = None):
        """arena: where the blocks rest, which may hold them already (`to_arena`); default a new one, pinned on
        CUDA (plain host memory for the meta device and the CPU, which the tests stand in with)."""
        arena = arena or PinnedArena(pin=device.type == "cuda")
        self.device = device
        self.blocks = [_HostBlock(block, arena) for block in blocks]
        self._copier = _Copier(device)
        self._pending: dict[int, tuple[list[Tensor], list[Tensor], object]] = {}  # block index -> its copy in flight
        self._handles = [
            model.register_forward_pre_hook(self._model_starts, with_kwargs=True),
            model.register_forward_hook(lambda _module, _args, _output: self._drop_pending(), always_call=True),
        ]
        for index, block in enumerate(self.blocks):
            self._handles += [
                block.module.register_forward_pre_hook(lambda _module, _args, i=index: self._block_starts(i)),
                block.module.register_forward_hook(lambda _module, _args, _output, i=index: self._block_ends(i),
                                                   always_call=True),
            ]

    @property
    def nbytes(self) -> int:
        """Bytes of the streamed tensors: what crosses the host link per forward."""
        return sum(block.nbytes for block in self.blocks)

    def _model_starts(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.blocks and 0 not in self._pending:
            self._pending[0] = self._copier.issue(self.blocks[0])

        def to_device(value: object) -> object:
            return value.to(self.device, non_blocking=True) if isinstance(value, Tensor) else value

        return tree_map(to_device, args), tree_map(to_device, kwargs)

    def _block_starts(self, index: int) -> None:
        tensors, parts, arrived = self._pending.pop(index, None) or self._copier.issue(self.blocks[index])
        self._copier.wait(parts, arrived)
        self.blocks[index].install(tensors)
        following = index + 1
        if following < len(self.blocks) and following not in self._pending:
            self._pending[following] = self._copier.issue(self.blocks[following])

    def _block_ends(self, index: int) -> None:
        self.blocks[index].rest()

    def _drop_pending(self) -> None:
        """A copy issued for a block that did not run (the forward raised) is dropped with the forward."""
        self._pending.clear()

    def remove(self) -> None:
        """Stop streaming: hooks off; the blocks keep resting in host memory (for a model about to be dropped)."""
        for handle in self._handles:
            handle.remove()
        self._pending.clear()


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """A FLUX transformer's blocks in the order they run: the double blocks, then the single ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def t5_layers(t5: nn.Module) -> list[nn.Module]:
    """T5's encoder layers in the order they run (its embedding and final norm stay on the GPU: 0.25 GiB)."""
    return list(t5.encoder.block)


def stream_t5(t5: nn.Module, device: torch.device) -> StreamedBlocks:
    """T5 (loaded on the host) with its layers streaming to `device` and the rest (its embedding, tied under two
    names, and final norm: 0.25 GiB) moved there for good."""
    streamed = StreamedBlocks(t5, t5_layers(t5), device)
    resting = {id(module) for layer in t5_layers(t5) for module in layer.modules()}
    moved: dict[int, Tensor] = {}  # a tied tensor is moved once and stays tied
    for owner in t5.modules():
        if id(owner) in resting:
            continue
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is not None and id(tensor) not in moved:
                    on_device = tensor.detach().to(device)
                    moved[id(tensor)] = nn.Parameter(on_device, requires_grad=False) if isinstance(tensor, nn.Parameter) else on_device
                if tensor is not None:
                    table[name] = moved[id(tensor)]
    return streamed
