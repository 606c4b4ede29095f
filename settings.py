"""Every environment setting the server reads, in one place: name, default and meaning.

Values are read on each call (not cached at import), so a test or an operator's wrapper can change them. Only
this module touches os.environ for our settings; a test fails if another module does. docs/configuration.md's
table lists every setting declared here (a test checks that too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str  # as text, as it would be written in the environment; "" means unset
    meaning: str


SETTINGS: dict[str, Setting] = {}


def _declare(name: str, default: str, meaning: str) -> None:
    SETTINGS[name] = Setting(name, default, meaning)


# --- model weights -------------------------------------------------------------------------------------------
_declare("FLUX_WEIGHTS", "", "`tiny` forces the tiny random test weights; `real` forces real weights")
_declare("FLUX_WEIGHTS_DIR", "", "real weights folder; missing components are downloaded into it (from FLUX_WEIGHTS_URL, else the Hub)")
_declare("FLUX_WEIGHTS_URL", "", "base URL of the operator's weight host: each missing folder is fetched as `<base>/<folder>.tar` instead of from the Hub (private and loopback hosts allowed)")
_declare("FLUX_WEIGHTS_TIMEOUT_S", "3600", "overall deadline for one weights tar from FLUX_WEIGHTS_URL, seconds (34 GB at 10 MB/s)")
_declare("FLUX_SAFETY_WEIGHTS_DIR", "", "take the two safety checker folders from here")
_declare("FLUX_TINY_WEIGHTS_DIR", "", "where the tiny test weights are generated (default `.cache/tiny-weights`)")
_declare("FLUX_DTYPE", "", "`bf16` or `fp32` (default: bf16 on GPU, fp32 on CPU)")

# --- go_fast (fp8) and model variants ------------------------------------------------------------------------
_declare("FLUX_RESIDENT_VARIANTS", "", "variants built at setup and kept (`dev-bf16`, `schnell-fp8`, ...; default: what the deployed schema uses, trimmed by the GPU memory plan); any other is built when first used, one at a time")
_declare("FLUX_GO_FAST_LORA_MULTIPLIER", "1", "multiplies LoRA scales on the fp8 path (the hosted model used 1.5)")
_declare("FLUX_LORA_SCALE_CURVE", "linear", "`hosted`: one LoRA without go_fast acts as scale² (the hosted model's curve)")
_declare("FLUX_COMPILE", "1", "`0`: no torch.compile of the go_fast transformers (compiling happens only on CUDA)")
_declare("FLUX_COMPILE_WARMUP", "1", "`0`: skip setup's warm-up steps that compile the blocks' graphs (the first request of each shape then compiles)")
_declare("FLUX_COMPILE_CACHE_DIR", "", "where compiled kernels are kept between boots (default: `FLUX_WEIGHTS_DIR/.compile-cache`, else `.cache/compile-cache`)")
_declare("FLUX_CUDNN_ATTENTION", "0", "`1`: prefer cuDNN's fused attention on Hopper (off by default: PyTorch disables it for CUDA < 12.9, pytorch#169849)")
_declare("FLUX_GPU_MEMORY_GB", "", "GPU memory the plan may use, GiB (default: the GPU's total less 0.6 GiB; 79 without a GPU)")
_declare("FLUX_GPU_RESERVE_GB", "10", "GPU memory the plan keeps free for activations (up to 1440x1440 x 4; T5 takes this room while it encodes when it waits in host memory), GiB")

# --- output files --------------------------------------------------------------------------------------------
_declare("FLUX_WRITE_METADATA", "0", "`1`: each image file says how it was made (prompt, seed, model, steps, guidance, size, go_fast and the precision that ran, each LoRA's source without query string or server folder, and its scale, the project's version): PNG in a `parameters` text chunk, WebP and JPEG in XMP. Off by default, as on the hosted model: a prompt inside a shared image can surprise its owner")

# --- request files -------------------------------------------------------------------------------------------
_declare("FLUX_INPUT_LOCAL_DIRS", "", "folders a request's `image`/`mask` paths may come from besides uploads (`:`-separated; unset: none)")

# --- LoRAs ---------------------------------------------------------------------------------------------------
_declare("FLUX_DEFAULT_LORA", "", "main LoRA when a request has none (after cog's setup weights, `COG_WEIGHTS`)")
_declare("FLUX_LORA_MEMORY_GB", "8", "converted LoRAs kept in host memory, GiB (least recently used dropped first; a request's own LoRAs are kept while it needs them, even past this)")
_declare("FLUX_LORA_MEMORY_SLOTS", "", "also caps how many converted LoRAs are kept (unset: FLUX_LORA_MEMORY_GB alone decides)")
_declare("FLUX_LORA_LOCAL_DIRS", "", "folders a request's local LoRA paths may come from (`:`-separated; unset: none)")
_declare("FLUX_LORA_MAX_GB", "3", "largest LoRA file accepted")
_declare("FLUX_LORA_CACHE_DIR", "~/.cache/flux/loras", "LoRA download cache")
_declare("FLUX_LORA_CACHE_MAX_GB", "20", "LoRA cache size cap (least recently used evicted first)")
_declare("FLUX_CACHE_MIN_FREE_GB", "2", "free disk the cache always leaves")

# --- LoRA hosts and tokens -----------------------------------------------------------------------------------
_declare("HF_ENDPOINT", "https://huggingface.co", "Hugging Face base URL (a mirror, or a local server in tests)")
_declare("FLUX_CIVITAI_BASE_URL", "https://civitai.com", "CivitAI base URL")
_declare("FLUX_REPLICATE_BASE_URL", "https://replicate.com", "Replicate base URL (`_weights` tars)")
_declare("HF_TOKEN", "", "Hugging Face token (read by huggingface_hub); sent only to the Hub host")
_declare("CIVITAI_API_TOKEN", "", "CivitAI token; sent only to the CivitAI host, as a header")
_declare("REPLICATE_API_TOKEN", "", "Replicate token; sent only to the Replicate host")

# --- downloads -----------------------------------------------------------------------------------------------
_declare("FLUX_DOWNLOAD_CONNECTIONS", "8", "parallel ranged connections per file")
_declare("FLUX_DOWNLOAD_CHUNK_MB", "64", "largest ranged chunk, in MiB")
_declare("FLUX_DOWNLOAD_CONNECT_TIMEOUT_S", "10", "connect timeout, seconds (not retried)")
_declare("FLUX_DOWNLOAD_STALL_TIMEOUT_S", "20", "a download that gets less than 16 KiB in this many seconds has stalled and fails at once (not retried)")
_declare("FLUX_DOWNLOAD_TIMEOUT_S", "600", "overall deadline for one file, seconds (3 GB at 5 MB/s)")
_declare("FLUX_DOWNLOAD_RETRIES", "1", "further attempts after a quick failure (5xx, dropped connection); never for stalls or timeouts")
_declare("FLUX_ALLOW_PRIVATE_URLS", "", "`1`: user URLs may reach private, loopback and link-local addresses")

TRUSTED_BASE_URL_SETTINGS = ("HF_ENDPOINT", "FLUX_CIVITAI_BASE_URL", "FLUX_REPLICATE_BASE_URL")


def text(name: str) -> str:
    """The setting's value, stripped; its declared default when unset or blank."""
    return os.environ.get(name, "").strip() or SETTINGS[name].default


def is_set(name: str) -> bool:
    """Whether the environment sets this (an operator's choice, as opposed to the default)."""
    SETTINGS[name]  # noqa: B018  (KeyError for undeclared names)
    return bool(os.environ.get(name, "").strip())


def number(name: str) -> float:
    """A numeric setting; a clear message instead of a traceback for a typo."""
    raw = text(name)
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def flag(name: str) -> bool:
    return text(name).lower() in ("1", "true", "yes", "on")


def paths(name: str) -> list[str]:
    """A `:`-separated list of folders (os.pathsep), empty entries dropped."""
    return [part for part in text(name).split(os.pathsep) if part]
