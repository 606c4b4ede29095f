"""Shared fixtures: the tiny weights (built once per machine into .cache) and a real coglet server. The session's
settings are set in pytest_configure, before any test module is collected, and undone at the end of the session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.cog_server import start_cog_server, stop_cog_server

ROOT = Path(__file__).resolve().parent.parent
_SESSION_ENVIRONMENT = pytest.StashKey[pytest.MonkeyPatch]()
_LORA_CACHE = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """The whole session's environment, inherited by every process a test starts (coglet servers included)."""
    environment = pytest.MonkeyPatch()
    lora_cache = Path(tempfile.mkdtemp(prefix="flux-lora-cache-"))
    environment.setenv("FLUX_WEIGHTS", "tiny")  # never real weights in tests, even on a GPU box
    # downloaded LoRAs go to a throw-away cache; the local protocol servers live on loopback
    environment.setenv("FLUX_LORA_CACHE_DIR", str(lora_cache))
    defaults = {
        "FLUX_TINY_WEIGHTS_DIR": str(ROOT / ".cache" / "tiny-weights"),
        # in-process tests pass their tmp_path images by path (a served request may not; see flux/inputs.py)
        "FLUX_INPUT_LOCAL_DIRS": tempfile.gettempdir(),
    }
    for name, value in defaults.items():
        if name not in os.environ:
            environment.setenv(name, value)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:  # script/test's workers share the cores, not each all
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        environment.setenv("OMP_NUM_THREADS", str(threads))  # the processes tests start
        torch.set_num_threads(threads)
    config.stash[_SESSION_ENVIRONMENT], config.stash[_LORA_CACHE] = environment, lora_cache


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """script/test's workers take whole test modules, so module fixtures (a real-width model, a server) are built
    once; the simulated-card tier is split finer (tests/fixtures/scheduling.py). An explicit --dist wins."""
    if config.getvalue("dist") != "load":
        return None
    from tests.fixtures.scheduling import ModulesAndCardRuns

    return ModulesAndCardRuns(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    config.stash[_SESSION_ENVIRONMENT].undo()
    shutil.rmtree(config.stash[_LORA_CACHE], ignore_errors=True)


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


@pytest.fixture
def allow_gpu_config_on_cpu(monkeypatch):
    """torchao refuses to build the fp8-activation config without a CUDA >= 8.9 GPU; its weights (what our code
    builds, fuses, restores and counts) need no GPU, so lift that gate for the test. Running them would need one."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)


@pytest.fixture(scope="session")
def real_width_weights():
    """Root of the real-width synthetic weights folder (tests/fixtures/real_width_folder.py), built once per machine."""
    from tests.fixtures.real_width_folder import real_width_root

    return real_width_root()
