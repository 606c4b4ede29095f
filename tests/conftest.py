"""Shared fixtures: the tiny weights (built once per machine into .cache) and a real coglet server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.cog_server import start_cog_server, stop_cog_server

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLUX_TINY_WEIGHTS_DIR", str(ROOT / ".cache" / "tiny-weights"))
os.environ["FLUX_WEIGHTS"] = "tiny"  # never real weights in tests, even on a GPU box
# downloaded LoRAs go to a throw-away cache; the local protocol servers live on loopback
os.environ["FLUX_LORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="flux-lora-cache-")
# in-process tests pass their tmp_path images by path (a served request may not; see flux/inputs.py)
os.environ.setdefault("FLUX_INPUT_LOCAL_DIRS", tempfile.gettempdir())


@pytest.fixture(scope="session")
def tiny_weights():
    from weights.locations import tiny_weight_paths

    return tiny_weight_paths()


@pytest.fixture(scope="session")
def predictor(tiny_weights):
    """One in-process Predictor for the session (setup once, like a running container)."""
    from predict import Predictor

    instance = Predictor()
    instance.setup()
    return instance


@pytest.fixture(scope="session")
def cog_server(tiny_weights, tmp_path_factory):
    server = start_cog_server(tmp_path_factory.mktemp("coglet"), {"FLUX_ALLOW_PRIVATE_URLS": "1"})
    yield server
    stop_cog_server(server)
