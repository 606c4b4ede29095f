"""script/serve serves each predictor class with that class's own schema (coglet validates and fills in inputs from
`.cog/openapi_schema.json` in its working folder, whatever class it runs), through the real coglet server."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image

from script._schema import openapi_document
from script._serve import absolute_folders
from script.cog_inputs import load_predictor
from tests.fixtures.cog_server import start_cog_server, stop_cog_server

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["Predictor", "FastPredictor", "LegacyPredictor"]
# inputs every class takes: 256x256, one step
SMALL = {"prompt": "a photo of TOK", "num_inference_steps": 1, "seed": 7, "aspect_ratio": "custom", "width": 256,
         "height": 256, "output_format": "png"}
FOREIGN = {"extra_lora": "owner/some-lora", "go_fast": True, "not_an_input": 1}  # a name no class takes, last


@pytest.fixture(scope="module", params=CLASSES)
def served(request, tiny_weights, tmp_path_factory):
    ref = f"predict.py:{request.param}"
    if request.param == "Predictor":  # the session's server (tests/conftest.py) already is one, started the same way
        yield ref, request.getfixturevalue("cog_server")
        return
    committed = (ROOT / ".cog" / "openapi_schema.json").read_bytes()
    server = start_cog_server(tmp_path_factory.mktemp("serve"), {"COG_PREDICT_TYPE_STUB": ref})
    yield ref, server
    stop_cog_server(server)
    assert (ROOT / ".cog" / "openapi_schema.json").read_bytes() == committed, "serving rewrote the committed schema"


def image_of(body: dict) -> Image.Image:
    [uri] = body["output"]
    return Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))


def test_each_class_is_served_with_its_own_schema_and_predicts(served):
    ref, server = served
    schema = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert schema["components"]["schemas"]["Input"] == openapi_document(load_predictor(ref))["components"]["schemas"]["Input"]
    body = server.predict(input=SMALL).json()
    assert body["status"] == "succeeded", body
    assert image_of(body).size == (256, 256)


def test_each_class_keeps_to_its_own_bounds(served):
    """lora_scale goes to 3 on the trained-LoRA pages, to 2 on the older page: coglet refuses by the class served."""
    ref, server = served
    response = server.predict(input={**SMALL, "lora_scale": 2.5})
    if ref.endswith("LegacyPredictor"):
        assert response.status_code == 422 and "lora_scale" in response.text, response.text
    else:
        assert response.status_code == 200 and response.json()["status"] == "succeeded", response.text


def test_inputs_the_served_schema_does_not_name_are_dropped(served):
    """coglet drops request inputs the served schema does not name: a LegacyPredictor server given `extra_lora` and
    `go_fast` runs the request without them (the image is the plain request's) instead of failing on them."""
    ref, server = served
    own = set(openapi_document(load_predictor(ref))["components"]["schemas"]["Input"]["properties"])
    foreign = {name: value for name, value in FOREIGN.items() if name not in own}
    assert "not_an_input" in foreign and (("extra_lora" in foreign) == ref.endswith("LegacyPredictor"))
    plain = server.predict(input=SMALL).json()
    with_foreign = server.predict(input={**SMALL, **foreign}).json()
    assert with_foreign["status"] == "succeeded", with_foreign
    assert image_of(with_foreign).tobytes() == image_of(plain).tobytes()


def test_serve_refuses_a_class_that_is_not_there_in_one_sentence():
    for ref, message in [("predict.py:Nope", "predict.py has no class Nope."),
                         ("missing.py:Predictor", "name a class as FILE:CLASS")]:
        result = subprocess.run([sys.executable, str(ROOT / "script" / "_serve.py")], capture_output=True, text=True,
                                env={**os.environ, "COG_PREDICT_TYPE_STUB": ref}, timeout=60)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-500:]
        assert len(result.stderr.strip().splitlines()) == 1


def test_relative_folders_in_settings_keep_meaning_the_folder_script_serve_started_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_folders("loras:/srv/loras::~/x") == f"{tmp_path}/loras:/srv/loras::~/x"
