"""LoRA key layouts: which tensor a key holds, and which model module(s) its name means.

Every layout we accept names the same few things in different spellings:
- the module: diffusers names (`transformer_blocks.0.attn.to_q`), BFL/original names
  (`double_blocks.0.img_attn.qkv`), XLabs processor names (`double_blocks.0.processor.qkv_lora1`),
  each either dotted or with dots turned into underscores (kohya), behind a trainer-specific prefix;
- the tensor's role: down/A, up/B, alpha, a bias of either, a DoRA magnitude, or a LyCORIS LoKr/LoHa factor.

Rather than one converter per layout, we build one table from the loaded model: every name a module can
have (in every naming) maps to a `Target`. A target is one Linear, or several for BFL's fused layers
(`img_attn.qkv` = to_q|to_k|to_v, `linear1` = to_q|to_k|to_v|proj_mlp): the up matrix is then split by rows,
with the row counts taken from the real modules (LyCORIS deltas are split by rows too, see lora/lycoris.py), so any FLUX-shaped model works (diffusers' converters
hard-code FLUX.1's 3072/12288 and 19/38 blocks). Naming facts follow diffusers'
`lora_conversion_utils` (kohya, XLabs and BFL converters).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

# Roles of a tensor within one LoRA module. LyCORIS roles are named as in the file (`lokr_w1`, `hada_w2_b`...).
DOWN, UP, ALPHA, DOWN_BIAS, UP_BIAS, MAGNITUDE = "down", "up", "alpha", "down_bias", "up_bias", "magnitude"
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

_ROLE_PATTERNS: tuple[tuple[re.Pattern[str], Mapping[str, str]], ...] = (
    # PEFT/diffusers/ai-toolkit/BFL: x.lora_A.weight, x.lora_A.default.weight (adapter-named PEFT)
    (re.compile(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.(weight|bias)$"),
     {"A.weight": DOWN, "B.weight": UP, "A.bias": DOWN_BIAS, "B.bias": UP_BIAS}),
    # kohya / ComfyUI
    (re.compile(r"^(.+)\.lora_(down|up)\.(weight|bias)$"),
     {"down.weight": DOWN, "up.weight": UP, "down.bias": DOWN_BIAS, "up.bias": UP_BIAS}),
    # DoRA magnitudes: PEFT writes x.lora_magnitude_vector (older versions and diffusers' conversion add
    # .weight, a raw PEFT model adds the adapter name), LyCORIS x.dora_scale
    (re.compile(r"^(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?()$"), {"lora_magnitude_vector.": MAGNITUDE}),
    (re.compile(r"^(.+)\.(dora_scale)()$"), {"dora_scale.": MAGNITUDE}),
    # LyCORIS LoKr and LoHa factors (kohya/LyCORIS names and PEFT's, which are the same)
    (re.compile(rf"^(.+)\.({'|'.join(LOKR_ROLES + LOHA_ROLES)})()$"),
     {f"{role}.": role for role in LOKR_ROLES + LOHA_ROLES}),
    # old diffusers attention processors (x.lora.down.weight, x.lora_linear_layer.up.weight) and XLabs
    # (double_blocks.0.processor.qkv_lora1.down.weight)
    (re.compile(r"^(.+?)(?:\.lora|\.lora_linear_layer)?\.(down|up)\.(weight)$"),
     {"down.weight": DOWN, "up.weight": UP}),
    (re.compile(r"^(.+)\.(alpha)()$"), {"alpha.": ALPHA}),
)


# Other algorithms' keys: LyCORIS full (.diff), GLoRA, IA3, (B)OFT and norm layers.
_UNSUPPORTED_KINDS = (
    (re.compile(r"\.diff(_b)?$"), "full weight differences (LyCORIS full/.diff, not supported)"),
    (re.compile(r"\.(a1|a2|b1|b2|bm)\.weight$"), "LyCORIS GLoRA tensors (not supported)"),
    (re.compile(r"\.on_input$"), "IA3 tensors (not supported)"),
    (re.compile(r"\.(oft_blocks|oft_diag|rescale)$"), "LyCORIS OFT/BOFT tensors (not supported)"),
)


def unsupported_kind(key: str) -> str:
    """Why a key that split_key rejects is not used."""
    for pattern, reason in _UNSUPPORTED_KINDS:
        if pattern.search(key):
            return reason
    return "not LoRA matrices (e.g. norm weights)"


def split_key(key: str) -> tuple[str, str] | None:
    """(module name as written, role) for a LoRA/LyCORIS tensor key; None for anything else (norms, .diff...)."""
    for pattern, roles in _ROLE_PATTERNS:
        match = pattern.match(key)
        if match:
            module, kind, param = match.groups()
            return module, roles[f"{kind}.{param}"]
    return None


_BFL_NAME = re.compile(r"(^|[._])(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)[._]")
_LABELS = (
    (("lora_unet_", "lycoris_"), "kohya"),
    (("lora_transformer_",), "kohya (diffusers names)"),
    (("diffusion_model.", "model.diffusion_model."), "ComfyUI"),
    (("base_model.model.",), "PEFT"),
    (("transformer.",), "diffusers/PEFT"),
)


def layout_label(module_name: str) -> str:
    """A name for the log of the layout a transformer module name is written in."""
    if ".processor." in module_name:
        return "XLabs"
    bfl_names = " (BFL names)" if _BFL_NAME.search(module_name) else ""
    for prefixes, label in _LABELS:
        if module_name.startswith(prefixes):
            return label if label in ("kohya", "ComfyUI") else label + bfl_names
    return "BFL" if bfl_names else "diffusers/PEFT (no prefix)"


@dataclass(frozen=True)
class Piece:
    """One real Linear fed by (some rows of) a LoRA's up matrix."""

    path: str  # "transformer.single_transformer_blocks.0.attn.to_q"
    rows: tuple[slice, ...] | None  # rows of the LoRA's up matrix, concatenated; None = all of them


@dataclass(frozen=True)
class Target:
    pieces: tuple[Piece, ...]
    out_rows: int  # rows the LoRA's up matrix must have
    in_features: int


# Trainer prefixes in front of the module name, per model component. T5 gets none of ours: dropped.
TRANSFORMER_PREFIXES = (
    "transformer.", "model.diffusion_model.", "diffusion_model.", "base_model.model.", "unet.",
    "lora_unet_", "lora_transformer_", "lycoris_", "",
)
CLIP_PREFIXES = ("text_encoder.", "text_encoders.clip_l.transformer.", "lora_te1_", "lora_te_")
T5_PREFIXES = ("text_encoder_2.", "text_encoders.t5xxl.transformer.", "lora_te2_")
# Where a name with an unknown prefix may start; kept to block-level words so a stray "proj_out" elsewhere
# cannot be mistaken for ours.
_ROOT_WORDS = ("transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks", "text_model")
# Module names of UNet-based Stable Diffusion (SD1.5/SDXL) and of SD3's original layout.
_SD_UNET_WORDS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
_SD3_WORDS = ("joint_blocks", "x_block", "context_block")


def foreign_architecture(module_name: str) -> str | None:
    """The model family a module name belongs to when it is plainly not FLUX (None when it could be)."""
    if any(word in module_name for word in _SD_UNET_WORDS):
        return "Stable Diffusion 1.5/SDXL (UNet)"
    if any(word in module_name for word in _SD3_WORDS):
        return "Stable Diffusion 3"
    return None


def _linear(root: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = root.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


class _Names:
    """Names of one model component's Linears, dotted and underscored."""

    def __init__(self, root: nn.Module, root_name: str):
        self.root, self.root_name = root, root_name
        self.targets: dict[str, Target] = {}
        self._underscored: dict[str, str] = {}

    def add(self, name: str, members: list[str]) -> None:
        """Register `name` for the row-wise concatenation of the Linears `members`."""
        linears = [_linear(self.root, member) for member in members]
        if name in self.targets or any(linear is None for linear in linears):
            return
        in_features = {linear.in_features for linear in linears}
        if len(in_features) != 1:
            return
        pieces, start = [], 0
        for member, linear in zip(members, linears, strict=True):
            rows = None if len(members) == 1 else (slice(start, start + linear.out_features),)
            pieces.append(Piece(f"{self.root_name}.{member}", rows))
            start += linear.out_features
        self._register(name, Target(tuple(pieces), start, in_features.pop()))

    def _register(self, name: str, target: Target) -> None:
        self.targets[name] = target
        # kohya writes "_" for "."; the mapping is unambiguous for FLUX and CLIP names.
        self._underscored.setdefault(name.replace(".", "_"), name)

    def add_halves_swapped(self, name: str, member: str) -> None:
        """Register `name` for one Linear whose two output halves the LoRA stores in the other order."""
        linear = _linear(self.root, member)
        if linear is None or linear.out_features % 2:
            return
        half = linear.out_features // 2
        piece = Piece(f"{self.root_name}.{member}", (slice(half, 2 * half), slice(0, half)))
        if name not in self.targets:
            self._register(name, Target((piece,), linear.out_features, linear.in_features))

    def lookup(self, name: str) -> Target | None:
        target = self.targets.get(name)
        if target is None:
            dotted = self._underscored.get(name)
            target = self.targets.get(dotted) if dotted else None
        return target


class ModuleTable:
    """Every name (in every supported layout) of every LoRA-able Linear of the given model components."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module | None = None):
        self._transformer = _Names(transformer, "transformer")
        _add_diffusers_names(self._transformer)
        _add_bfl_names(self._transformer)
        self._clip: _Names | None = None
        if text_encoder is not None:
            self._clip = _Names(text_encoder, "text_encoder")
            _add_clip_names(self._clip)

    @property
    def has_text_encoder(self) -> bool:
        return self._clip is not None

    def resolve(self, module_name: str) -> Target | None:
        """The target of a module name as written in a LoRA file (with its trainer prefix)."""
        for names, prefixes in ((self._clip, CLIP_PREFIXES), (self._transformer, TRANSFORMER_PREFIXES)):
            if names is None:
                continue
            for prefix in prefixes:
                if module_name.startswith(prefix):
                    target = names.lookup(module_name[len(prefix):])
                    if target is not None:
                        return target
        # An unknown trainer prefix: try the name from each block-level word on.
        for separator in re.finditer(r"[._]", module_name):
            rest = module_name[separator.end():]
            names = self._clip if rest.startswith("text_model") else self._transformer
            if rest.startswith(_ROOT_WORDS) and names is not None:
                target = names.lookup(rest)
                if target is not None:
                    return target
        return None


def _add_diffusers_names(names: _Names) -> None:
    for name, module in names.root.named_modules():
        if isinstance(module, nn.Linear):
            names.add(name, [name])


def _add_bfl_names(names: _Names) -> None:
    """BFL (original FLUX repo) names, also used by kohya, ComfyUI and XLabs, plus diffusers' fused names."""
    transformer = names.root
    for i in range(len(getattr(transformer, "transformer_blocks", ()))):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        img_qkv = [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"]
        txt_qkv = [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"]
        for name, members in (
            (f"{b}.img_attn.qkv", img_qkv), (f"{b}.processor.qkv_lora1", img_qkv), (f"{d}.attn.to_qkv", img_qkv),
            (f"{b}.txt_attn.qkv", txt_qkv), (f"{b}.processor.qkv_lora2", txt_qkv),
            (f"{d}.attn.to_added_qkv", txt_qkv),
            (f"{b}.img_attn.proj", [f"{d}.attn.to_out.0"]), (f"{b}.processor.proj_lora1", [f"{d}.attn.to_out.0"]),
            (f"{b}.txt_attn.proj", [f"{d}.attn.to_add_out"]), (f"{b}.processor.proj_lora2", [f"{d}.attn.to_add_out"]),
            (f"{b}.img_mlp.0", [f"{d}.ff.net.0.proj"]), (f"{b}.img_mlp.2", [f"{d}.ff.net.2"]),
            (f"{b}.txt_mlp.0", [f"{d}.ff_context.net.0.proj"]), (f"{b}.txt_mlp.2", [f"{d}.ff_context.net.2"]),
            (f"{b}.img_mod.lin", [f"{d}.norm1.linear"]), (f"{b}.txt_mod.lin", [f"{d}.norm1_context.linear"]),
        ):
            names.add(name, members)
    for i in range(len(getattr(transformer, "single_transformer_blocks", ()))):
        b, s = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        qkv = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"]
        names.add(f"{b}.linear1", [*qkv, f"{s}.proj_mlp"])
        names.add(f"{b}.processor.qkv_lora", qkv)  # XLabs: only the attention part of linear1
        names.add(f"{s}.attn.to_qkv", qkv)
        names.add(f"{b}.linear2", [f"{s}.proj_out"])
        names.add(f"{b}.processor.proj_lora", [f"{s}.proj_out"])
        names.add(f"{b}.modulation.lin", [f"{s}.norm.linear"])
    for name, member in (
        ("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out"),
        ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ):
        names.add(name, [member])
    # BFL's final modulation yields (shift, scale); diffusers' norm_out.linear yields (scale, shift).
    names.add_halves_swapped("final_layer.adaLN_modulation.1", "norm_out.linear")


def _add_clip_names(names: _Names) -> None:
    """CLIP Linears under their own names and with/without `text_model.`, which LoRA files always use
    (transformers 5 dropped that level from CLIPTextModel)."""
    for name, module in names.root.named_modules():
        if isinstance(module, nn.Linear):
            names.add(name, [name])
            alias = name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}"
            names.add(alias, [name])
