"""The value of every synthetic tensor: a pure function of (seed, component key, tensor name) and the shape.

Each tensor draws from its own generator, seeded by a hash of those three, so any one tensor can be made again
alone (the in-memory builder and the fp8 LoRA fuser's bf16 originals do that instead of reading a file), and a
truncated model's tensors equal the full model's. A draw is in float32, rounded to bf16: that is the value the
files hold, and modules hold it in their own dtype. torch's CPU and CUDA generators differ, so the values are
those of the device type that draws them: files written on CPU equal modules built on CPU.

Scales follow each library's own init, so activations stay finite through every block:
- Linear and Conv2d: U(±1/sqrt(fan_in)) for weight and bias (torch's default, which diffusers keeps);
- T5: N(0, fan_in^-1/2), the query also divided by sqrt(d_kv), embedding N(0, 1), relative attention bias
  N(0, d_model^-1/2) (T5's init: it has no 1/sqrt(d) in its attention, the query's init stands in for it);
- other embeddings and class/position tokens: N(0, 0.02) (transformers' initializer_range);
- norms: weight 1, bias 0; the CompVis checker's concept embeddings and thresholds: 1, as it inits them (so
  random images are never flagged: a cosine never exceeds 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from weights.synthetic.components import Component

STORED_DTYPE = torch.bfloat16
INITIALIZER_RANGE = 0.02
CONSTANT_ONE = {"concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights"}
TOKEN_PARAMETERS = {"class_embedding", "cls_token", "position_embeddings"}


@dataclass(frozen=True)
class Draw:
    kind: str  # "uniform" (bound), "normal" (std) or "constant" (value)
    scale: float


def tensor_seed(seed: int, key: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def draw_tensor(draw: Draw, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The canonical value (bf16) of one tensor, drawn on `device`."""
    if draw.kind == "constant":
        return torch.full(shape, draw.scale, dtype=STORED_DTYPE, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    values = torch.empty(shape, dtype=torch.float32, device=device)
    if draw.kind == "uniform":
        values.uniform_(-draw.scale, draw.scale, generator=generator)
    else:
        values.normal_(0.0, draw.scale, generator=generator)
    return values.to(STORED_DTYPE)


def init_rule(model: nn.Module, name: str) -> Draw:
    """How the parameter `name` of `model` is drawn (see the module docstring)."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    parameter = getattr(module, attribute)
    if attribute in CONSTANT_ONE:
        return Draw("constant", 1.0)
    if attribute in TOKEN_PARAMETERS:
        return Draw("normal", INITIALIZER_RANGE)
    if "Norm" in type(module).__name__:
        return Draw("constant", 1.0 if attribute == "weight" else 0.0)
    t5 = type(model).__name__.startswith("T5")
    if isinstance(module, nn.Embedding):
        if not t5:
            return Draw("normal", INITIALIZER_RANGE)
        return Draw("normal", model.config.d_model**-0.5 if "relative_attention_bias" in name else 1.0)
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        fan_in = math.prod(module.weight.shape[1:])
        if not t5:
            return Draw("uniform", fan_in**-0.5)
        query = module_name.endswith(".q")
        return Draw("normal", (fan_in * (model.config.d_kv if query else 1)) ** -0.5)
    raise ValueError(f"no init rule for {name} ({type(module).__name__}, shape {tuple(parameter.shape)})")


class SyntheticTensors:
    """The tensors of one synthetic component by name: a TensorSource (weights/store.py), no files."""

    def __init__(self, component: Component, model: nn.Module, seed: int):
        """model: the component built on meta (Component.build_on_meta), for names, shapes and init rules."""
        self.component, self.seed = component, seed
        self._rules = {name: (init_rule(model, name), tuple(p.shape)) for name, p in model.named_parameters()}

    def names(self) -> list[str]:
        return list(self._rules)

    def read(self, name: str, device: torch.device | str, dtype: torch.dtype = STORED_DTYPE) -> Tensor:
        """The tensor drawn on `device`, in `dtype` (from its bf16 value, as a loader casts the stored one)."""
        draw, shape = self._rules[name]
        return draw_tensor(draw, shape, tensor_seed(self.seed, self.component.key, name), device).to(dtype)

    def nbytes(self) -> int:
        """Bytes as stored (bf16)."""
        return sum(math.prod(shape) for _, shape in self._rules.values()) * STORED_DTYPE.itemsize
