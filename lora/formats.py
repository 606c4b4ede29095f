"""Reading a LoRA file and converting it, whatever its key layout, to deltas for our modules.

`read_lora` accepts safetensors only (a pickle can run code when loaded). `convert_lora` finds, for each
LoRA module in the file, the Linear(s) it changes in the loaded transformer (and CLIP text encoder), checks
every shape and value against them, and returns `LoraWeights`: per module path a delta (lora/deltas.py: LoRA's
B·A, LyCORIS LoKr's kron or LoHa's Hadamard product, optionally a DoRA magnitude) and its alpha/rank factor, so
that the effective weight is W + scale·(alpha/rank)·ΔW (lora/apply.py does that). LyCORIS rules: lora/lycoris.py.

Decisions:
- alpha: an explicit `.alpha` key wins, then diffusers' `lora_adapter_metadata` (lora_alpha/alpha_pattern),
  else alpha = rank (factor 1). rank is the down matrix's row count, as kohya, ComfyUI and diffusers read it.
  alpha 0 means "no scaling" (factor 1), as in kohya's sd-scripts, which defined the key.
- CLIP keys (kohya `lora_te1_`/`lora_te_`, diffusers `text_encoder.`, ComfyUI `text_encoders.clip_l.`) are
  applied to the CLIP text encoder when the caller passes one, as diffusers and ComfyUI do; otherwise they
  are ignored with a log line. T5 keys (`lora_te2_`, `text_encoder_2.`, `text_encoders.t5xxl.`) are ignored
  with a log line: no FLUX trainer we know of trains T5, and diffusers drops them too.
- Keys of algorithms we cannot apply (LyCORIS full `.diff`, GLoRA, IA3, OFT), full norm weights of BFL control
  LoRAs, and modules we do not have are ignored and counted; a LoRA must still change at least one
  transformer module, and every module it names must fit, or it is refused as a whole. A module in a known
  format that we cannot apply (LoKr/LoHa Tucker factors for convolutions) refuses the whole file, naming it.
- Shapes are checked here, once, against the loaded model: this is where the file's keys and the user's
  input name are known, so the error can say which key does not fit. Values too: a tensor with NaN or Inf
  would make every image NaN, so such a file is refused as damaged.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from errors import UserError
from lora import layouts, lycoris
from lora.deltas import LoraDelta, WeightDelta, alpha_factor, take_rows
from lora.layouts import ALPHA, DOWN, DOWN_BIAS, MAGNITUDE, UP, UP_BIAS, Target

log = logging.getLogger(__name__)

_SUPPORTED = "diffusers/PEFT, ai-toolkit, kohya, ComfyUI, XLabs, BFL or LyCORIS (LoKr, LoHa, DoRA)"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the LoraConfig here


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """A converted LoRA: deltas by module path ("transformer.transformer_blocks.0.attn.to_q",
    "text_encoder.encoder.layers.0.self_attn.q_proj"), and what was used or ignored of the file."""

    deltas: Mapping[str, WeightDelta]
    matched: int  # file keys that went into deltas
    ignored: Mapping[str, str]  # file key -> why it was not used
    layout: str = "LoRA"  # the key layout, for the log
    identity: str = field(default_factory=lambda: f"lora-{uuid.uuid4().hex}")  # same identity = same deltas

    def describe(self) -> str:
        components = Counter(path.split(".", 1)[0].replace("_", " ") for path in self.deltas)
        per_component = ", ".join(f"{name} {count}" for name, count in sorted(components.items()))
        text = f"{self.layout}: changes {len(self.deltas)} modules ({per_component})"
        text += f" from {self.matched} keys"
        if self.ignored:
            reasons = Counter(self.ignored.values())
            text += f"; ignored {len(self.ignored)} keys (" + "; ".join(
                f"{count} {reason}" for reason, count in reasons.most_common()
            ) + f", e.g. {next(iter(self.ignored))!r})"
        return text


# --- reading ----------------------------------------------------------------------------------------


def read_lora(path: str | Path, *, input_name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a .safetensors LoRA file, on the CPU, in their stored dtypes, and its string metadata, read
    in one opening. The file's format and header were checked once, by lora.fetch where its bytes arrived
    (pickles never get here); safe_open runs no code, so anything else that reaches it is refused as damaged."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, dict(file.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{input_name}: {path.name} is a damaged .safetensors file ({error}).") from error


def load_lora(
    path: str | Path, *, input_name: str, transformer: nn.Module, text_encoder: nn.Module | None = None,
    identity: str | None = None,
) -> LoraWeights:
    """read_lora + convert_lora (with the file's metadata)."""
    state_dict, metadata = read_lora(path, input_name=input_name)
    return convert_lora(
        state_dict, input_name=input_name, transformer=transformer, text_encoder=text_encoder,
        metadata=metadata, identity=identity,
    )


# --- converting ---------------------------------------------------------------------------------------


@dataclass
class _Module:
    """The tensors of one LoRA module as found in the file."""

    name: str
    tensors: dict[str, Tensor] = field(default_factory=dict)  # role -> tensor
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key


def _group_by_module(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, _Module], dict[str, str]]:
    modules: dict[str, _Module] = {}
    ignored: dict[str, str] = {}
    for key, tensor in state_dict.items():
        parts = layouts.split_key(key)
        if parts is None:
            ignored[key] = layouts.unsupported_kind(key)
            continue
        name, role = parts
        module = modules.setdefault(name, _Module(name))
        module.tensors[role], module.keys[role] = tensor, key
    return modules, ignored


def _as_matrix(tensor: Tensor) -> Tensor:
    # Some tools store Linear LoRAs as 1×1 convolutions.
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    return tensor


class _AlphaFromMetadata:
    """diffusers' lora_adapter_metadata: {"transformer.lora_alpha": 8, "transformer.alpha_pattern": {...}}."""

    def __init__(self, metadata: Mapping[str, str] | None):
        config: dict = {}
        if metadata and _METADATA_KEY in metadata:
            try:
                config = json.loads(metadata[_METADATA_KEY])
            except ValueError:
                config = {}
        self._config = config if isinstance(config, dict) else {}

    def alpha(self, module_path: str) -> float | None:
        component, _, name = module_path.partition(".")
        patterns = self._config.get(f"{component}.alpha_pattern") or {}
        for pattern, value in patterns.items():
            # PEFT matches a pattern against the end of the module name.
            try:
                if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
                    return float(value)
            except re.error:
                continue
        value = self._config.get(f"{component}.lora_alpha")
        return float(value) if value is not None else None


def _lora_misfit(module: _Module, target: Target) -> str | None:
    """Why this LoRA module (down/up) does not fit its target (None when it fits)."""
    down = module.tensors[DOWN]
    rank = down.shape[0] if down.ndim == 2 else None
    expected = {
        DOWN: (rank, target.in_features),
        UP: (target.out_rows, rank),
        DOWN_BIAS: (rank,),
        UP_BIAS: (target.out_rows,),
    }
    for role, shape in expected.items():
        if role in module.tensors and tuple(module.tensors[role].shape) != shape:
            got = "×".join(map(str, module.tensors[role].shape))
            want = "×".join("rank" if size is None else str(size) for size in shape)
            return f"{module.keys[role]!r} is {got}, this model needs {want}"
    return None


def _non_finite_key(module: _Module) -> str | None:
    """The first key of this module holding NaN or Inf."""
    for role, tensor in module.tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            tensor = tensor.float()  # fp8 files
        # One reduction and no temporary: NaN propagates to both ends, an infinity shows at one.
        lowest, highest = torch.aminmax(tensor)
        if not (torch.isfinite(lowest) and torch.isfinite(highest)):
            return module.keys[role]
    return None


def _bias_is_supported(target: Target, components: Mapping[str, nn.Module]) -> bool:
    for piece in target.pieces:
        root, _, path = piece.path.partition(".")
        if components[root].get_submodule(path).bias is None:
            return False
    return True


def _lora_deltas(module: _Module, target: Target, alpha_from_metadata: _AlphaFromMetadata) -> list[LoraDelta]:
    """A LoRA module's delta per real Linear; a fused module's up matrix (and up bias) is split by rows."""
    misfit = _lora_misfit(module, target)
    if misfit:
        raise ValueError(misfit)
    rank = module.tensors[DOWN].shape[0]
    file_alpha = float(module.tensors[ALPHA].item()) if ALPHA in module.tensors else None
    deltas = []
    for piece in target.pieces:
        alpha = file_alpha if file_alpha is not None else alpha_from_metadata.alpha(piece.path)
        deltas.append(LoraDelta(
            down=module.tensors[DOWN],
            up=take_rows(module.tensors[UP], piece.rows),
            factor=alpha_factor(alpha, rank),
            up_bias=take_rows(module.tensors.get(UP_BIAS), piece.rows),
            down_bias=module.tensors.get(DOWN_BIAS),
        ))
    return deltas


def _module_deltas(
    module: _Module, kind: str, target: Target, alpha_from_metadata: _AlphaFromMetadata,
) -> dict[str, WeightDelta]:
    """One file module's deltas per real Linear, with their DoRA magnitudes.

    Raises ValueError when the module does not fit the model, lycoris.Unsupported when we cannot apply it."""
    alpha = module.tensors.get(ALPHA)
    if alpha is not None and alpha.numel() != 1:
        raise ValueError(f"{module.keys[ALPHA]!r} has {alpha.numel()} values, alpha must be one number")
    if kind == lycoris.LORA:
        deltas = _lora_deltas(module, target, alpha_from_metadata)
    else:
        deltas = lycoris.lycoris_deltas(kind, module.tensors, module.keys, target)
    magnitudes = lycoris.magnitudes(module.tensors, module.keys, target)
    return {
        piece.path: delta if magnitude is None else replace(delta, magnitude=magnitude, norm_group=group)
        for piece, delta, (magnitude, group) in zip(target.pieces, deltas, magnitudes, strict=True)
    }


def convert_lora(
    state_dict: Mapping[str, Tensor], *, input_name: str, transformer: nn.Module,
    text_encoder: nn.Module | None = None, metadata: Mapping[str, str] | None = None, identity: str | None = None,
) -> LoraWeights:
    """Map a LoRA state dict in any supported layout onto the given FLUX transformer (and CLIP text encoder).

    Raises UserError (naming `input_name`) when the file is for another architecture, when a module it
    names has other shapes than ours, or when it changes no transformer module. Does not touch the models.
    `identity` names these deltas for LoraFuser's "nothing changed" check (e.g. the cache key + file hash).
    Steps: refuse a foreign file; convert each module, noting any problem; refuse a file the problems make unusable.
    """
    modules, ignored = _group_by_module(state_dict)
    _refuse_foreign(state_dict, modules, input_name)
    findings = _Findings(ignored)
    converter = _ModuleConverter(transformer, text_encoder, _AlphaFromMetadata(metadata))
    for module in modules.values():
        converter.convert(module, findings)
    _refuse_unusable(findings, list(state_dict), input_name)

    weights = LoraWeights(
        deltas=findings.deltas, matched=findings.matched, ignored=findings.ignored,
        layout=findings.layouts.most_common(1)[0][0], **({"identity": identity} if identity else {}),
    )
    if findings.ignored:
        log.warning("%s: partial match: %d keys matched, %d ignored. %s",
                    input_name, findings.matched, len(findings.ignored), weights.describe())
    else:
        log.info("%s: %s", input_name, weights.describe())
    return weights


@dataclass
class _Findings:
    """What converting a file's modules found: deltas, keys left out and why, and modules that refuse the file."""

    ignored: dict[str, str]  # file key -> why it was not used
    deltas: dict[str, WeightDelta] = field(default_factory=dict)
    matched: int = 0  # file keys that went into deltas
    layouts: Counter[str] = field(default_factory=Counter)  # key layout (and algorithm) per transformer module
    damaged: list[str] = field(default_factory=list)  # keys holding NaN or Inf
    unsupported: list[str] = field(default_factory=list)  # modules in a format we know but cannot apply
    misfits: list[str] = field(default_factory=list)  # modules whose shapes are not this model's

    def ignore(self, module: _Module, reason: str) -> None:
        self.ignored.update(dict.fromkeys(module.keys.values(), reason))


class _ModuleConverter:
    """Converts file modules against the loaded models; notes every problem in the findings, raises none."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module | None, alphas: _AlphaFromMetadata):
        self.table = layouts.ModuleTable(transformer, text_encoder)
        self.components = {"transformer": transformer, **({"text_encoder": text_encoder} if text_encoder else {})}
        self.alphas = alphas

    def convert(self, module: _Module, findings: _Findings) -> None:
        target = self._resolve(module, findings)
        kind = self._algorithm(module, findings) if target is not None else None
        if target is None or kind is None:
            return
        damaged = _non_finite_key(module)
        if damaged:
            findings.damaged.append(damaged)
            return
        self._sanitise(module, target, findings)
        if any(piece.path in findings.deltas for piece in target.pieces):
            findings.ignore(module, "a second LoRA for the same module")
            return
        try:
            deltas = _module_deltas(module, kind, target, self.alphas)
        except ValueError as misfit:
            findings.misfits.append(str(misfit))
            return
        except lycoris.Unsupported as error:
            findings.unsupported.append(str(error))
            return
        findings.deltas.update(deltas)
        findings.matched += len(module.keys)
        if target.pieces[0].path.startswith("transformer."):
            kinds = ([] if kind == lycoris.LORA else [kind]) + (["DoRA"] if MAGNITUDE in module.tensors else [])
            findings.layouts[" ".join([layouts.layout_label(module.name), *kinds])] += 1

    def _resolve(self, module: _Module, findings: _Findings) -> Target | None:
        """The model module this file module changes; None (noted as ignored) when there is none to change."""
        if module.name.startswith(layouts.T5_PREFIXES):
            findings.ignore(module, "for the T5 text encoder (not supported)")
            return None
        target = self.table.resolve(module.name)
        if target is None:
            if module.name.startswith(layouts.CLIP_PREFIXES) and not self.table.has_text_encoder:
                findings.ignore(module, "for the CLIP text encoder, which is not loaded")
            else:
                findings.ignore(module, "for no module of this model")
        return target

    @staticmethod
    def _algorithm(module: _Module, findings: _Findings) -> str | None:
        """LoRA, LoKr or LoHa; None (noted) when the module cannot be applied as it is."""
        try:
            kind = lycoris.algorithm(set(module.tensors))
        except lycoris.Unsupported as error:
            findings.unsupported.append(f"{module.name!r} {error}")
            return None
        if kind is None or (kind == lycoris.LORA and not {DOWN, UP} <= module.tensors.keys()):
            findings.ignore(module, "without their down/up partner")
            return None
        return kind

    def _sanitise(self, module: _Module, target: Target, findings: _Findings) -> None:
        """Matrices where tools stored 1×1 convolutions; biases dropped (noted) for a model module without bias."""
        module.tensors = {role: _as_matrix(tensor) for role, tensor in module.tensors.items()}
        has_bias = DOWN_BIAS in module.tensors or UP_BIAS in module.tensors
        if has_bias and not _bias_is_supported(target, self.components):
            for role in (DOWN_BIAS, UP_BIAS):
                if role in module.keys:
                    findings.ignored[module.keys.pop(role)] = "a bias for a module without bias"
                    module.tensors.pop(role)


def _refuse_foreign(state_dict: Mapping[str, Tensor], modules: Mapping[str, _Module], input_name: str) -> None:
    """UserError for an empty file, or one trained for another architecture (SD1.5/SDXL module names)."""
    if not state_dict:
        raise UserError(f"{input_name}: the LoRA file holds no tensors; give a FLUX.1 LoRA .safetensors file.")
    for name, foreign in ((name, layouts.foreign_architecture(name)) for name in modules):
        if foreign:
            raise UserError(
                f"{input_name}: this LoRA was trained for {foreign}, not FLUX.1 (it has modules like {name!r}); "
                "use a LoRA trained for FLUX.1 [dev] or [schnell]."
            )


def _refuse_unusable(findings: _Findings, keys: list[str], input_name: str) -> None:
    """UserError when a module is damaged, of a variant we cannot apply or of other shapes, or when the file
    changes no transformer module."""
    if findings.damaged:
        raise UserError(
            f"{input_name}: the LoRA file has non-finite values (NaN or Inf) in {findings.damaged[0]!r}; it is "
            "damaged. Train or export it again, or use another file."
        )
    if findings.unsupported:
        raise UserError(
            f"{input_name}: this LoRA uses a LyCORIS/DoRA variant we cannot apply yet in {len(findings.unsupported)} "
            f"of its modules ({findings.unsupported[0]}). LoRA, LoKr, LoHa and DoRA files for Linear layers are "
            "supported."
        )
    if findings.misfits:
        raise UserError(
            f"{input_name}: this LoRA does not fit FLUX.1: {len(findings.misfits)} of its modules have other shapes "
            f"({findings.misfits[0]}). It was probably trained for another model (SD1.5, SDXL, SD3, FLUX.2...); "
            "use a LoRA trained for FLUX.1 [dev] or [schnell]."
        )
    if not any(path.startswith("transformer.") for path in findings.deltas):
        examples = ", ".join(repr(key) for key in keys[:3])
        reasons = "; ".join(sorted({reason for reason in findings.ignored.values() if "not supported" in reason}))
        raise UserError(
            f"{input_name}: no key of this file matches a FLUX.1 transformer module (keys like {examples}"
            + (f"; {reasons}" if reasons else "")
            + f"); it is not a FLUX.1 LoRA in a supported layout ({_SUPPORTED})."
        )
