"""Tiny tokenizers for the tiny FLUX: CLIP's byte-level BPE and T5's Unigram, learnt from a built-in corpus.

Both are written in the real repos' file layout, so transformers loads them as it loads the real ones, and
both learners are written out (deterministic) rather than using the `tokenizers` trainers, whose results
change from run to run.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from weights.tiny.repo_build import write_json

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


def write_clip_tokenizer(directory: Path) -> int:
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


def write_t5_tokenizer(directory: Path) -> int:
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
