"""Shared fixtures: the tiny weights (built once per machine into .cache) and a real coglet server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
TINY_ROOT = Path(os.environ.setdefault("FLUX_TINY_WEIGHTS_DIR", str(ROOT / ".cache" / "tiny-weights")))
os.environ["FLUX_WEIGHTS"] = "tiny"  # never real weights in tests, even on a GPU box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_weights():
    from weights.config import tiny_weight_paths

    return tiny_weight_paths()


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """One in-process Predictor for the session (setup once, like a running container)."""
    from predict import Predictor

    instance = Predictor()
    instance.setup()
    return instance


class CogServer:
    def __init__(self, port: int, process: subprocess.Popen, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log_path = log_path

    def predict(self, timeout: float = 120, headers: dict | None = None, **body) -> requests.Response:
        return requests.post(f"{self.url}/predictions", json=body, headers=headers or {}, timeout=timeout)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_cog_server(tmp_dir: Path, extra_env: dict | None = None) -> CogServer:
    port = free_port()
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        # coglet's worker re-imports itself, so the venv's bin must come first on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    log_path = tmp_dir / f"coglet-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT,  # coglet validates inputs only with .cog/openapi_schema.json in its working directory
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = CogServer(port, process, log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"coglet exited with {process.returncode}:\n{server.logs()[-3000:]}")
        try:
            health = requests.get(f"{server.url}/health-check", timeout=2).json()
            if health.get("status") == "READY":
                return server
            if health.get("status") in ("SETUP_FAILED", "DEFUNCT"):
                raise RuntimeError(f"coglet setup failed: {health}")
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"coglet did not become ready:\n{server.logs()[-3000:]}")


def stop_cog_server(server: CogServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def cog_server(tiny_weights, tmp_path_factory):
    server = start_cog_server(tmp_path_factory.mktemp("coglet"))
    yield server
    stop_cog_server(server)
