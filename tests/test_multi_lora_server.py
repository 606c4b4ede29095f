"""MultiLoraPredictor served by the real coglet (given its committed schema): lists of LoRAs posted over HTTP give
the image of the weights merged here by hand, every refusal is a 422 or a failed prediction naming the input,
and a switch from one set to another leaves nothing of the first."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from script.cog_inputs import predict_with_defaults
from tests.fixtures import lora_factory as factory
from tests.fixtures.cog_server import start_cog_server, stop_cog_server

pytest_plugins = ["tests.fixtures.servers"]

REQUEST = {"prompt": "a photo of TOK", "num_inference_steps": 2, "megapixels": "0.25", "seed": 3, "output_format": "png",
           "disable_safety_checker": True}
SCALES = [0.8, -0.5, 1.2, 0.3, 2.0, -1.0, 0.6, 3.0, 0.9]


@pytest.fixture(scope="module")
def multi_server(tiny_weights, tmp_path_factory):
    server = start_cog_server(tmp_path_factory.mktemp("coglet-multi"), {"FLUX_ALLOW_PRIVATE_URLS": "1"},
                              class_name="MultiLoraPredictor")
    yield server
    stop_cog_server(server)


@pytest.fixture(scope="module")
def specs(predictor) -> list[factory.LoraSpec]:
    """Nine LoRAs on the transformer and CLIP, each on every third Linear from its own offset: overlapping sets."""
    pipelines = predictor.generator.pipelines
    transformer, clip = pipelines.transformer("dev"), pipelines.text_encoder
    paths = sorted(linears(predictor))
    return [factory.make_spec(transformer, clip, only=paths[index % 3 :: 3], seed=40 + index, magnitude=0.2) for index in range(9)]


@pytest.fixture
def urls(file_server, predictor, specs, tmp_path) -> list[str]:
    transformer = predictor.generator.pipelines.transformer("dev")
    return [
        file_server.add(f"/lora-{index}.safetensors", factory.write_layout("diffusers", spec, transformer, tmp_path / f"{index}.safetensors").read_bytes())
        for index, spec in enumerate(specs)
    ]


def linears(predictor) -> dict[str, nn.Linear]:
    pipelines = predictor.generator.pipelines
    roots = {"transformer": pipelines.transformer("dev"), "text_encoder": pipelines.text_encoder}
    return {f"{root}.{name}": module for root, component in roots.items()
            for name, module in component.named_modules() if isinstance(module, nn.Linear)}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def hand_merged_image(predictor, terms: list[tuple[factory.LoraSpec, float]]) -> np.ndarray:
    """The image of the tiny dev model whose weights are W + Σ scale·(alpha/rank)·B@A (float64, rounded once),
    made in this process with no LoRA requested; the weights are put back afterwards."""
    predict_with_defaults(predictor, **REQUEST)  # any earlier LoRA comes off: the originals are in place
    modules = linears(predictor)
    saved = {path: module.weight.detach().clone() for path, module in modules.items()}
    try:
        with torch.no_grad():
            for path, module in modules.items():
                merged = saved[path].double()
                for spec, scale in terms:
                    if path in spec.modules:
                        lora = spec.modules[path]
                        merged += scale * (lora.alpha / lora.rank) * (lora.up.double() @ lora.down.double())
                module.weight.copy_(merged)
        return pixels(predict_with_defaults(predictor, **REQUEST)[0].read_bytes())
    finally:
        with torch.no_grad():
            for path, module in modules.items():
                module.weight.copy_(saved[path])


def served(server, **inputs) -> np.ndarray:
    body = server.predict(input={**REQUEST, **inputs}).json()
    assert body["status"] == "succeeded", body.get("error") or body
    return pixels(base64.b64decode(body["output"][0].partition(",")[2]))


def lists(urls: list[str], picks: range | list[int]) -> dict[str, list]:
    return {"extra_loras": [urls[i] for i in picks], "extra_lora_scales": [SCALES[i] for i in picks]}


def assert_same_image(ours: np.ndarray, expected: np.ndarray) -> None:
    """Equal pixels, but for a level here and there: the fuser sums in float32 (one GEMM per module), the oracle in
    float64, and a weight one float32 step apart can move a pixel across a rounding edge."""
    difference = np.abs(ours.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.001, (difference.max(), (difference > 0).mean())


@pytest.mark.parametrize("count", [0, 1, 3, 8])
def test_any_number_of_loras_gives_the_hand_merged_image(multi_server, predictor, specs, urls, count):
    picks = range(count)
    expected = hand_merged_image(predictor, [(specs[i], SCALES[i]) for i in picks])
    ours = served(multi_server, **lists(urls, picks))
    assert_same_image(ours, expected)
    if count:
        # the comparison tells sets apart: one LoRA fewer, or the last one at another scale, is another image
        with pytest.raises(AssertionError):
            assert_same_image(ours, hand_merged_image(predictor, [(specs[i], SCALES[i]) for i in picks[:-1]]))
        with pytest.raises(AssertionError):
            terms = [(specs[i], SCALES[i]) for i in picks[:-1]] + [(specs[count - 1], SCALES[count - 1] + 0.1)]
            assert_same_image(ours, hand_merged_image(predictor, terms))


def test_the_main_lora_and_eight_extra_ones(multi_server, predictor, specs, urls):
    expected = hand_merged_image(predictor, [(specs[8], 0.5)] + [(specs[i], SCALES[i]) for i in range(8)])
    assert_same_image(served(multi_server, replicate_weights=urls[8], lora_scale=0.5, **lists(urls, range(8))), expected)


def test_a_switch_between_sets_of_8_and_3_leaves_nothing_of_the_last(multi_server, predictor, specs, urls):
    eight, three = list(range(8)), [8, 1, 5]  # the three share two LoRAs with the eight, at the same scales
    expected_three = hand_merged_image(predictor, [(specs[i], SCALES[i]) for i in three])
    expected_eight = hand_merged_image(predictor, [(specs[i], SCALES[i]) for i in eight])
    nothing = hand_merged_image(predictor, [])
    for _ in range(2):
        assert_same_image(served(multi_server, **lists(urls, eight)), expected_eight)
        assert_same_image(served(multi_server, **lists(urls, three)), expected_three)
    assert np.array_equal(served(multi_server), nothing)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda u: {"extra_loras": [u[0]] * 2}, r"extra_loras\[1\]: is the same LoRA as extra_loras\[0\]"),
        (lambda u: {"extra_loras": [u[0]], "replicate_weights": u[0]}, r"extra_loras\[0\]: is the same LoRA as replicate_weights"),
        (lambda u: {"extra_loras": u[:9]}, r"extra_loras: 9 LoRAs given; one request takes at most 8"),
        (lambda u: {"extra_loras": u[:3], "extra_lora_scales": [1, 1]}, r"extra_lora_scales: 2 scale\(s\) for 3 LoRA\(s\)"),
        (lambda u: {"extra_loras": u[:1], "extra_lora_scales": [1, 1]}, r"extra_lora_scales: 2 scale\(s\) for 1 LoRA\(s\)"),
        (lambda u: {"extra_loras": u[:2], "extra_lora_scales": [1, 3.5]}, r"extra_lora_scales\[1\]: 3.5 is out of range; use -1 to 3"),
        (lambda u: {"extra_loras": u[:2], "extra_lora_scales": [-1.5, 1]}, r"extra_lora_scales\[0\]: -1.5 is out of range"),
        (lambda u: {"extra_loras": [u[0], ""]}, r"extra_loras\[1\]: is empty"),
    ],
)
def test_a_refused_list_fails_naming_the_input_and_the_next_request_is_clean(multi_server, urls, inputs, message):
    import re

    body = multi_server.predict(input={**REQUEST, **inputs(urls)}).json()
    assert body["status"] == "failed" and re.search(message, body["error"]), body.get("error")
    assert np.array_equal(served(multi_server), served(multi_server, extra_loras=[]))


@pytest.mark.parametrize(
    "inputs, where",
    [
        ({"extra_loras": "owner/style"}, "extra_loras"),  # one source, not a list
        ({"extra_loras": None}, "extra_loras"),  # cog: an optional list is not nullable
        ({"extra_loras": [5]}, "extra_loras/0"),
        ({"extra_lora_scales": ["1"]}, "extra_lora_scales/0"),
        ({"extra_lora_scales": 0.5}, "extra_lora_scales"),
    ],
)
def test_a_list_of_the_wrong_type_is_422(multi_server, inputs, where):
    response = multi_server.predict(input={**REQUEST, **inputs})
    assert response.status_code == 422, response.text
    assert where in json.dumps(response.json()["detail"])
