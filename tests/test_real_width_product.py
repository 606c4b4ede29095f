"""The product at FLUX.1's real widths (1 double + 1 single block, 1 T5 layer; tests/fixtures/real_width_folder.py):
the GPU memory plan's bytes against the modules the product really loads, and a prediction through coglet on
FLUX_WEIGHTS_DIR. The tiny model cannot speak to either: its widths are not FLUX's."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image
from torch import nn

from flux.fast.memory import BF16, build_on_meta, real_sizes
from flux.fast.quantize import is_quantised
from flux.pipelines import FluxPipelines
from flux.variants import Variant
from tests.fixtures.cog_server import start_cog_server, stop_cog_server
from tests.fixtures.real_width_folder import LAYERS
from weights.store import WeightsFolder

pytestmark = pytest.mark.real_width
CPU = torch.device("cpu")


def truncated_on_meta() -> dict[str, nn.Module]:
    """The memory plan's models with the folder's layer counts: what flux/fast/memory.py counts, truncated."""
    return build_on_meta(LAYERS)


def loaded_bytes(module: nn.Module) -> int:
    """What a loaded module holds: fp8 weights as their data and scales, everything else as stored."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        total += tensor.qdata.nbytes + tensor.scale.nbytes if is_quantised(tensor) else tensor.nbytes
    return total


@pytest.fixture(scope="module")
def pipelines(real_width_weights):
    """dev in bf16 (the GPU dtype) and fp8, loaded by the product from the folder."""
    store = WeightsFolder(real_width_weights / "FLUX.1-dev", real_width_weights / "FLUX.1-schnell")
    return FluxPipelines(store, CPU, torch.bfloat16, resident=(Variant("dev"), Variant("dev", "fp8")))


def test_the_memory_plan_counts_what_the_product_loads_within_one_percent(pipelines):
    planned = real_sizes(truncated_on_meta())
    shared = pipelines._shared
    measured = {
        "dev-bf16": loaded_bytes(pipelines.transformer("dev")),
        "dev-fp8": loaded_bytes(pipelines.transformer("dev-fp8")),
        "T5 XXL encoder (bf16)": loaded_bytes(shared["text_encoder_2"]),
        "CLIP text encoder (bf16)": loaded_bytes(shared["text_encoder"]),
        "VAE (bf16)": loaded_bytes(shared["vae"]),
    }
    expected = {**planned.variants, **planned.shared}
    for name, actual in measured.items():
        assert abs(actual - expected[name]) <= 0.01 * expected[name], f"{name}: loaded {actual}, planned {expected[name]}"
    assert measured["dev-fp8"] < 0.6 * measured["dev-bf16"]  # the blocks, most of the bytes, are fp8


def test_lora_originals_are_counted_in_the_model_dtype(pipelines):
    planned = real_sizes(truncated_on_meta()).lora_originals["dev-fp8"]
    linears = [m for c in (pipelines.transformer("dev"), pipelines.text_encoder) for m in c.modules() if isinstance(m, nn.Linear)]
    assert planned == sum(BF16 * m.weight.numel() for m in linears)


@pytest.fixture(scope="module")
def real_width_server(real_width_weights, tmp_path_factory):
    env = {"FLUX_WEIGHTS": "real", "FLUX_WEIGHTS_DIR": str(real_width_weights), "FLUX_RESIDENT_VARIANTS": "dev-bf16"}
    server = start_cog_server(tmp_path_factory.mktemp("coglet-real-width"), env)
    yield server
    stop_cog_server(server)


def test_a_prediction_through_coglet_at_real_widths(real_width_server):
    """Real widths end to end through the HTTP server: T5 and CLIP at their widths, the 3072-wide transformer, the
    16-channel VAE, both real-size safety models (their synthetic concept thresholds flag nothing)."""
    response = real_width_server.predict(
        timeout=600,
        input={"prompt": "a photo of TOK", "aspect_ratio": "custom", "width": 256, "height": 256,
               "num_inference_steps": 1, "output_format": "png", "seed": 1},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    (output,) = body["output"]
    image = Image.open(io.BytesIO(base64.b64decode(output.split(",", 1)[1])))
    assert image.size == (256, 256)
    assert "Using the TINY" not in real_width_server.logs()
