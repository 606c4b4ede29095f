"""How close go_fast output is to bf16 output: PSNR and LoRA strength (used by bench/_go_fast_quality.py and
the tests)."""

from __future__ import annotations

import numpy as np


def psnr(image: np.ndarray, reference: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images); images as floats in [0, peak]."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def lora_strength(fast_with: np.ndarray, fast_without: np.ndarray, base_with: np.ndarray, base_without: np.ndarray) -> float:
    """How much of the LoRA's bf16 effect the fast path shows: the projection of (fast with LoRA - fast without)
    onto (bf16 with LoRA - bf16 without), divided by the latter's squared norm. 1 = full strength."""
    fast = (np.asarray(fast_with, np.float64) - fast_without).ravel()
    base = (np.asarray(base_with, np.float64) - base_without).ravel()
    norm = float(base @ base)
    if norm == 0:
        raise ValueError("the LoRA does not change the bf16 output, so its strength is undefined")
    return float(fast @ base) / norm
