"""Cancel reaches a LoRA download, through the real coglet server: an `extra_lora` host that drips one byte
every 2 s cannot keep the server busy after a cancel, and the next request runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.fixtures.servers import FileServer, make_safetensors

pytest_plugins = ["tests.fixtures.servers"]

FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 1}


class _Webhooks(BaseHTTPRequestHandler):
    received: list[tuple[float, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        type(self).received.append((time.monotonic(), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhooks() -> Iterator[str]:
    _Webhooks.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Webhooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_cancel_ends_a_dripping_lora_download_and_the_next_request_runs(
    cog_server, file_server: FileServer, webhooks: str
) -> None:
    url = file_server.add("/drip.safetensors", make_safetensors(), ranges=False, drip=2.0)
    response = cog_server.predict(
        input={"prompt": "x", "extra_lora": url, **FAST},
        id="cancel-a-download",
        webhook=webhooks,
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202, response.text
    assert wait_for(lambda: file_server.requests_for("/drip.safetensors"), 30), "the download never started"
    time.sleep(2)  # a few bytes in: the compute thread is inside the download

    cancelled_at = time.monotonic()
    cancel = requests.post(f"{cog_server.url}/predictions/cancel-a-download/cancel", timeout=10)
    assert cancel.status_code == 200, cancel.text

    def finished() -> list[tuple[float, dict]]:
        return [(at, body) for at, body in _Webhooks.received if body.get("status") in ("canceled", "failed", "succeeded")]

    assert wait_for(finished, 30), _Webhooks.received
    ended_at, body = finished()[-1]
    assert body["status"] == "canceled", body
    assert ended_at - cancelled_at < 2.0, f"the prediction ended {ended_at - cancelled_at:.1f} s after the cancel"

    # the slot is free: the next request is accepted at once (not 409 for a busy download) and succeeds
    started = time.monotonic()
    while True:
        after = requests.post(f"{cog_server.url}/predictions", json={"input": {"prompt": "x", **FAST}}, timeout=120)
        if after.status_code != 409 or time.monotonic() - started > 2:
            break
        time.sleep(0.05)
    assert after.status_code == 200 and after.json()["status"] == "succeeded", after.text
