"""Tiny, randomly initialised FLUX weights in the real diffusers repo layout (for CPU tests).

`ensure_tiny_flux(root)` writes root/FLUX.1-dev and root/FLUX.1-schnell, each laid out like the
black-forest-labs repos on the Hub (model_index.json plus one folder per pipeline component), so the
code under test loads them exactly as it loads the real weights. Only the sizes are tiny.

Weights are stored as fp32 holding values rounded to bf16. The real repos store bf16, but with these
versions a plain `FluxPipeline.from_pretrained(dir)` then loads the diffusers parts as fp32 and the
transformers parts as bf16 and fails on the mix; fp32 files load in one dtype, and CPU runs fp32 faster.
The bf16 rounding makes loading with torch_dtype bf16 or fp32 give exactly the same numbers.

Everything is a pure function of fixed seeds and the built-in corpus: two builds are byte-identical.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import settings
from weights.tiny.repo_build import RepoBuild, write_json

BUILD = RepoBuild("tiny-flux", version="2")  # bump the version whenever the generated files change
FORMAT_VERSION, MARKER_FILE, PARTIAL_PREFIX = BUILD.version, BUILD.marker, BUILD.staging_prefix

VARIANT_DIRS = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}
TRANSFORMER_SEEDS = {"dev": 0, "schnell": 1}
CLIP_SEED, T5_SEED, VAE_SEED = 10, 11, 12
SHARED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")

# Shapes of the tiny transformer. in_channels = VAE latent_channels (4) x 2x2 packing.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)

# FLUX's VAE with tiny widths: 4 blocks keep the 8x downscale; FLUX's scaling and shift factors.
# The mid-block attention is off because at 1024x1024 it attends over 16k positions, which alone
# would take longer on CPU than the whole rest of the pipeline.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
)

# scheduler/scheduler_config.json of the real repos: dev shifts the schedule by image size, schnell does not.
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "dev": dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
    ),
    "schnell": dict(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=False,
    ),
}

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_EXTRA_IDS = 100
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

# What the tokenizers learn from: prompt-like English, so common prompt words become single tokens.
TOKENIZER_CORPUS = (
    "a photo of TOK, a portrait of a person in the style of TOK",
    "a cinematic still of a cat sitting on a wooden table next to a window, soft morning light",
    "an astronaut riding a horse on the moon, highly detailed, 8k, sharp focus",
    "a watercolor painting of a lighthouse on a rocky coast at sunset with dramatic clouds",
    "close-up photograph of a red apple, studio lighting, black background, 50mm lens",
    "a cozy cabin in a snowy forest at night, warm glow from the windows, stars in the sky",
    "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX! 0123456789",
    "an illustration of a dragon flying over a medieval castle; fantasy art, vibrant colors",
    "a bowl of ramen with egg and green onions, food photography, shallow depth of field",
    "street scene in tokyo at night, neon signs, rain reflections, people with umbrellas",
    "minimalist logo of a mountain and a river, flat design, blue and white",
    "a man wearing a black jacket and a woman in a yellow dress walking on the beach",
    "oil painting, impressionism, a garden full of flowers, bright summer day",
    "3d render of a cute robot holding a sign that says 'hello world' (octane, unreal engine)",
    "anime style girl with long hair, school uniform, cherry blossoms, detailed background",
    "aerial view of a city with skyscrapers, golden hour, photorealistic, wide angle",
    "vintage film photo of a car on a desert road, grain, kodak portra 400, 1970s",
    "pencil sketch of an old tree, cross hatching, paper texture: black & white @ 35% contrast",
)


def default_tiny_root() -> Path:
    """Where the tiny weights live unless a caller says otherwise (the .cache folder is git-ignored)."""
    configured = settings.text("FLUX_TINY_WEIGHTS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / ".cache" / "tiny-weights"


def ensure_tiny_flux(root: Path) -> dict[str, Path]:
    """Build the tiny dev and schnell repos under root unless a complete current build is there."""
    root = Path(root)
    targets = {variant: root / name for variant, name in VARIANT_DIRS.items()}
    BUILD.ensure(
        root,
        {
            targets["dev"]: lambda repo_dir: _write_repo(repo_dir, "dev"),
            targets["schnell"]: lambda repo_dir: _write_repo(repo_dir, "schnell", shared_from=targets["dev"]),
        },
    )
    return targets


def _write_repo(repo_dir: Path, variant: str, shared_from: Path | None = None) -> None:
    """Write one complete repo (RepoBuild adds the completion marker)."""
    repo_dir.mkdir(parents=True)
    write_json(repo_dir / "model_index.json", MODEL_INDEX)
    _write_scheduler(repo_dir / "scheduler", variant)
    _save_model(tiny_transformer(variant == "dev", TRANSFORMER_SEEDS[variant]), repo_dir / "transformer")
    if shared_from is not None:
        for component in SHARED_COMPONENTS:
            shutil.copytree(shared_from / component, repo_dir / component)
    else:
        clip_vocab_size = _write_clip_tokenizer(repo_dir / "tokenizer")
        t5_vocab_size = _write_t5_tokenizer(repo_dir / "tokenizer_2")
        _save_model(_tiny_clip_text_model(clip_vocab_size), repo_dir / "text_encoder")
        _save_model(_tiny_t5_encoder(t5_vocab_size), repo_dir / "text_encoder_2")
        _save_model(_tiny_vae(), repo_dir / "vae")


def tiny_transformer(guidance_embeds: bool, seed: int = 0):
    """A tiny FluxTransformer2DModel (dev: guidance_embeds=True, schnell: False), deterministic from seed."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG, guidance_embeds=guidance_embeds)


def _tiny_vae():
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(VAE_SEED)
    return AutoencoderKL(**VAE_CONFIG)


def _tiny_clip_text_model(vocab_size: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    # The pooled output feeds the transformer's pooled projection, so the widths must agree.
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TRANSFORMER_CONFIG["pooled_projection_dim"],
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TRANSFORMER_CONFIG["pooled_projection_dim"],
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(CLIP_SEED)
    return CLIPTextModel(config)


def _tiny_t5_encoder(vocab_size: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 shape (gated GELU, untied embeddings), with d_model = the transformer's text width.
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TRANSFORMER_CONFIG["joint_attention_dim"],
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(T5_SEED)
    return T5EncoderModel(config)


def _save_model(model: Any, directory: Path) -> None:
    # Round to bf16 and store as fp32 (see the module docstring). .bfloat16()/.float() rather than .to(dtype),
    # which in diffusers warns about fp32-pinned modules (FLUX has none).
    model.bfloat16().float().save_pretrained(directory, safe_serialization=True)


def _write_scheduler(directory: Path, variant: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant]).save_pretrained(directory)


def _write_clip_tokenizer(directory: Path) -> int:
    """Learn a byte-level BPE the way CLIP's works; write CLIP's four files. Returns the vocab size."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    # The same normalisation and word splitting as transformers' CLIPTokenizer applies when it loads these files.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter[tuple[str, ...]] = Counter()
    for text in TOKENIZER_CORPUS:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = _learn_bpe_merges(words)

    # CLIP's vocab order: every byte, every byte ending a word, the merges in order, then bos, eos.
    # (GPT-2's byte table maps printable bytes to themselves and the rest above 255, so code point order works.)
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + [left + right for left, right in merges]
    tokens = list(dict.fromkeys(tokens)) + [CLIP_BOS, CLIP_EOS]
    vocab = {token: index for index, token in enumerate(tokens)}

    directory.mkdir(parents=True)
    write_json(directory / "vocab.json", vocab)
    merge_lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    write_json(
        directory / "special_tokens_map.json",
        {
            "bos_token": _added_token(CLIP_BOS),
            "eos_token": _added_token(CLIP_EOS),
            "pad_token": CLIP_EOS,
            "unk_token": _added_token(CLIP_EOS),
        },
    )
    write_json(
        directory / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(vocab[token]): {**_added_token(token), "special": True} for token in (CLIP_BOS, CLIP_EOS)
            },
            "bos_token": CLIP_BOS,
            # The real repo says True; transformers 5 ignores that for BPE and warns on every load.
            "clean_up_tokenization_spaces": False,
            "do_lower_case": True,
            "eos_token": CLIP_EOS,
            "errors": "replace",
            "model_max_length": CLIP_MAX_LENGTH,
            "pad_token": CLIP_EOS,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_EOS,
        },
    )
    return len(vocab)


def _learn_bpe_merges(words: Counter[tuple[str, ...]], min_count: int = 2) -> list[tuple[str, str]]:
    """Classic BPE learning: merge the most frequent adjacent pair until none occurs min_count times.

    Written out rather than using tokenizers' BpeTrainer, which breaks ties between equally frequent
    pairs in hash-map order, so two runs can learn different merges. Here ties go to the smaller pair.
    """
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            return merges
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < min_count:
            return merges
        merges.append(best)
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def _write_t5_tokenizer(directory: Path) -> int:
    """Estimate a Unigram model the way T5's works; write tokenizer.json and configs. Returns the vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    splitter = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    pieces = _unigram_pieces(
        [word for text in TOKENIZER_CORPUS for word, _ in splitter.pre_tokenize_str(text)]
    )

    # T5's layout: <pad>=0, </s>=1, <unk>=2, the pieces, then the sentinels <extra_id_99> .. <extra_id_0>.
    sentinels = [f"<extra_id_{index}>" for index in reversed(range(T5_EXTRA_IDS))]
    specials = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)]
    vocab = specials + pieces + [(sentinel, 0.0) for sentinel in sentinels]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = splitter
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token, _ in specials])
    tokenizer.add_special_tokens([AddedToken(token, normalized=False) for token in sentinels])

    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    extra_ids = [f"<extra_id_{index}>" for index in range(T5_EXTRA_IDS)]
    write_json(
        directory / "special_tokens_map.json",
        {
            "additional_special_tokens": extra_ids,
            "eos_token": _added_token(T5_EOS),
            "pad_token": _added_token(T5_PAD),
            "unk_token": _added_token(T5_UNK),
        },
    )
    write_json(
        directory / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "additional_special_tokens": extra_ids,
            "clean_up_tokenization_spaces": True,
            "eos_token": T5_EOS,
            "extra_ids": T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": T5_MAX_LENGTH,
            "pad_token": T5_PAD,
            "tokenizer_class": "T5Tokenizer",
            "unk_token": T5_UNK,
        },
    )
    return len(vocab)


def _unigram_pieces(words: list[str], max_piece_length: int = 8) -> list[tuple[str, float]]:
    """Unigram pieces with log-probability scores, from substring counts (SentencePiece's seed estimate).

    Written out rather than using tokenizers' UnigramTrainer, whose EM sums in hash-map order: its
    scores and the order of equal pieces change from run to run.
    """
    counts: Counter[str] = Counter()
    for word in words:
        for start in range(len(word)):
            for end in range(start + 1, min(start + max_piece_length, len(word)) + 1):
                counts[word[start:end]] += 1
    # Every single character stays, so any text made of seen characters can be segmented.
    kept = {piece: count for piece, count in counts.items() if count >= 2 or len(piece) == 1}
    total = sum(kept.values())
    scored = [(piece, round(math.log(count / total), 4)) for piece, count in kept.items()]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def main(argv: list[str]) -> None:
    root = Path(argv[0]) if argv else default_tiny_root()
    for variant, path in ensure_tiny_flux(root).items():
        print(f"{variant}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
