"""The real cog HTTP server (coglet) with the tiny weights, driven over HTTP."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from PIL import Image

pytest_plugins = ["tests.fixtures.servers"]

FAST = {"num_inference_steps": 2, "megapixels": "0.25", "seed": 1}


def decode_data_uri(uri: str) -> tuple[str, Image.Image]:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return header[len("data:") : -len(";base64")], image


def png_bytes(size=(320, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


class Recorder(BaseHTTPRequestHandler):
    """Receives webhooks and serves one PNG at /photo.png, all on loopback."""

    received: list = []
    photo = png_bytes((400, 300))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.photo)))
        self.end_headers()
        self.wfile.write(self.photo)

    def log_message(self, *args):
        pass


@pytest.fixture()
def local_http():
    Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("output_format, pil_format, count", [("webp", "WEBP", 2), ("jpg", "JPEG", 1), ("png", "PNG", 3)])
def test_sync_prediction_returns_images(cog_server, output_format, pil_format, count):
    response = cog_server.predict(input={"prompt": "a photo of TOK", "output_format": output_format, "num_outputs": count, **FAST})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "succeeded", body
    assert len(body["output"]) == count
    for uri in body["output"]:
        mime, image = decode_data_uri(uri)
        assert image.format == pil_format and image.size == (512, 512)
    assert "Using seed: 1" in body["logs"]


def test_schnell_and_aspect_ratio(cog_server):
    body = cog_server.predict(input={"prompt": "x", "model": "schnell", "aspect_ratio": "16:9", **FAST}).json()
    assert body["status"] == "succeeded", body
    assert decode_data_uri(body["output"][0])[1].size == (672, 384)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_outputs": 5},
        {"num_outputs": 0},
        {"num_inference_steps": 51},
        {"guidance_scale": -0.5},
        {"prompt_strength": 1.5},
        {"lora_scale": 3.5},
        {"width": 100},
        {"aspect_ratio": "7:5"},
        {"output_format": "gif"},
        {"model": "pro"},
        {"megapixels": "2"},
        {"num_outputs": "two"},
    ],
)
def test_out_of_range_and_bad_enums_are_422(cog_server, bad):
    response = cog_server.predict(input={"prompt": "x", **bad})
    assert response.status_code == 422, response.text
    assert list(bad)[0] in json.dumps(response.json()["detail"])


def test_missing_prompt_is_422(cog_server):
    assert cog_server.predict(input={"num_outputs": 1}).status_code == 422


def test_user_error_fails_the_prediction_with_a_clear_message(cog_server):
    body = cog_server.predict(input={"prompt": "x", "aspect_ratio": "custom", "width": 512}).json()
    assert body["status"] == "failed"
    assert "aspect_ratio: 'custom' needs height" in body["error"]
    # and the server is healthy for the next request
    assert cog_server.predict(input={"prompt": "x", **FAST}).json()["status"] == "succeeded"


def test_async_prediction_with_webhook(cog_server, local_http):
    response = cog_server.predict(
        input={"prompt": "x", **FAST},
        webhook=f"{local_http}/hook",
        webhook_events_filter=["completed"],
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    prediction_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(e.get("status") == "succeeded" for e in Recorder.received):
        time.sleep(0.2)
    completed = [e for e in Recorder.received if e.get("status") == "succeeded"]
    assert completed, Recorder.received
    assert completed[-1]["id"] == prediction_id
    assert decode_data_uri(completed[-1]["output"][0])[1].size == (512, 512)


def test_cancel_a_running_prediction(cog_server, local_http):
    slow = {"prompt": "x", "num_inference_steps": 50, "num_outputs": 4, "megapixels": "1"}
    response = cog_server.predict(
        input=slow, id="cancel-me", webhook=f"{local_http}/hook", headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202, response.text
    time.sleep(1.5)
    started = time.monotonic()
    cancel = requests.post(f"{cog_server.url}/predictions/cancel-me/cancel", timeout=10)
    assert cancel.status_code == 200, cancel.text
    while time.monotonic() - started < 60 and not any(e.get("status") == "canceled" for e in Recorder.received):
        time.sleep(0.2)
    assert [e["status"] for e in Recorder.received][-1] == "canceled", Recorder.received
    assert time.monotonic() - started < 30, "a 50-step batch of four would take far longer than this"
    # the next prediction runs normally
    assert cog_server.predict(input={"prompt": "x", **FAST}).json()["status"] == "succeeded"


def test_image_as_data_uri_gives_img2img_at_the_image_size(cog_server):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes((320, 240))).decode()
    body = cog_server.predict(input={"prompt": "x", "image": uri, "aspect_ratio": "16:9", **FAST}).json()
    assert body["status"] == "succeeded", body
    assert decode_data_uri(body["output"][0])[1].size == (320, 240)
    assert "Mode: img2img" in body["logs"]


def test_image_and_mask_as_http_urls_give_inpaint(cog_server, local_http):
    body = cog_server.predict(input={"prompt": "x", "image": f"{local_http}/photo.png", "mask": f"{local_http}/photo.png", **FAST}).json()
    assert body["status"] == "succeeded", body
    assert decode_data_uri(body["output"][0])[1].size == (400, 304)
    assert "Mode: inpaint" in body["logs"]


def test_unreadable_image_fails_clearly(cog_server):
    uri = "data:image/png;base64," + base64.b64encode(b"not a png").decode()
    body = cog_server.predict(input={"prompt": "x", "image": uri, **FAST}).json()
    assert body["status"] == "failed" and "image: the file is not an image" in body["error"]


def test_extra_lora_from_a_local_server_through_coglet(cog_server, file_server, tmp_path):
    from tests.fixtures.lora_factory import make_spec, sdxl_tensors, write_layout, write_tensors
    from weights.tiny.flux import tiny_transformer

    transformer = tiny_transformer(guidance_embeds=True)
    lora = write_layout("kohya", make_spec(transformer, seed=3, magnitude=0.5), transformer, tmp_path / "style.safetensors")
    url = file_server.add("/style.safetensors", lora.read_bytes())
    sdxl = file_server.add("/sdxl.safetensors", write_tensors(sdxl_tensors(), tmp_path / "sdxl.safetensors").read_bytes())
    request = {"prompt": "x", **FAST, "output_format": "png"}

    plain = cog_server.predict(input=request).json()
    styled = cog_server.predict(input={**request, "extra_lora": url, "extra_lora_scale": 0.8}).json()
    assert styled["status"] == "succeeded", styled
    assert "extra_lora" in styled["logs"] and "changes" in styled["logs"]
    assert styled["output"] != plain["output"]

    broken = cog_server.predict(input={**request, "extra_lora": sdxl}).json()
    assert broken["status"] == "failed" and "extra_lora" in broken["error"]
    assert cog_server.predict(input=request).json()["output"] == plain["output"]


def test_coglet_sets_up_the_runner_without_deprecation_lines(cog_server):
    """cog >= 0.20 names: BaseRunner, run() and cog.yaml's `run:`. With the old ones (BasePredictor, predict())
    coglet 0.23.1 logs two DeprecationWarnings and its own "predict() is deprecated" line at every setup."""
    body = cog_server.predict(input={"prompt": "x", **FAST}).json()
    assert body["status"] == "succeeded", body
    everything = cog_server.logs() + body["logs"]
    assert "Setup complete" in everything  # the setup section is there to be read
    assert [line for line in everything.splitlines() if "deprecat" in line.lower()] == []
