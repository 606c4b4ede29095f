"""Device and dtype choices for the GPU path, checked on the CPU (no CUDA needed to decide them)."""

import pytest
import torch

from flux.pipelines import pick_dtype


def test_bf16_on_gpu_fp32_on_cpu(monkeypatch):
    monkeypatch.delenv("FLUX_DTYPE", raising=False)
    assert pick_dtype(torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu")) == torch.float32


def test_dtype_override(monkeypatch):
    monkeypatch.setenv("FLUX_DTYPE", "BF16")
    assert pick_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("FLUX_DTYPE", "fp8")
    with pytest.raises(ValueError, match="FLUX_DTYPE='fp8' is not one of"):
        pick_dtype(torch.device("cpu"))
