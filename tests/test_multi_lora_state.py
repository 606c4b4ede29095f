"""flux/lora_state.py with many LoRAs per request: files fetched in parallel, conversions kept by bytes (never one
the request still needs), and switching between sets of 3 and 8 leaves exactly the set asked for: no residue."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from errors import UserError
from flux import lora_state
from flux.lora_state import LoraState, converted_bytes, fetch_all
from flux.pipelines import FluxPipelines
from flux.request import LoraSpec, build_request
from flux.variants import Variant
from lora.deltas import KronDelta, LoraDelta
from lora.download.errors import DownloadCancelled
from lora.formats import LoraWeights, load_lora
from tests.fixtures import lora_factory as factory
from tests.fixtures.servers import file_reply
from weights.store import WeightsFolder

pytest_plugins = ["tests.fixtures.servers"]


@pytest.fixture(scope="module")
def pipelines(tiny_weights):
    store = WeightsFolder(tiny_weights.dev, tiny_weights.schnell)
    return FluxPipelines(store, torch.device("cpu"), torch.float32, resident=(Variant("dev"),))


def write_loras(pipelines, folder: Path, *, half: bool) -> list[tuple[Path, factory.LoraSpec]]:
    """Eleven LoRAs; with `half`, each on its own random half of the Linears (the CLIP text encoder's too), so
    every switch leaves modules that the new set does not touch but the old one did; else each on every Linear
    (all the same size in memory)."""
    transformer, clip = pipelines.transformer("dev"), pipelines.text_encoder
    paths = sorted(f"transformer.{n}" for n, m in transformer.named_modules() if isinstance(m, nn.Linear))
    paths += sorted(f"text_encoder.{n}" for n, m in clip.named_modules() if isinstance(m, nn.Linear))
    made = []
    for seed in range(11):
        only = random.Random(seed).sample(paths, len(paths) // 2) if half else None
        spec = factory.make_spec(transformer, clip, only=only, seed=100 + seed, magnitude=0.3)
        made.append((factory.write_layout("diffusers", spec, transformer, folder / f"lora-{seed}.safetensors"), spec))
    return made


@pytest.fixture(scope="module")
def lora_files(pipelines, tmp_path_factory) -> list[tuple[Path, factory.LoraSpec]]:
    return write_loras(pipelines, tmp_path_factory.mktemp("half-loras"), half=True)


@pytest.fixture(scope="module")
def same_size_files(pipelines, tmp_path_factory) -> list[tuple[Path, factory.LoraSpec]]:
    return write_loras(pipelines, tmp_path_factory.mktemp("full-loras"), half=False)


@pytest.fixture
def local(monkeypatch, lora_files, same_size_files):
    folders = [str(files[0][0].parent) for files in (lora_files, same_size_files)]
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", os.pathsep.join(folders))


def components(pipelines) -> dict[str, nn.Module]:
    return {"transformer": pipelines.transformer("dev"), "text_encoder": pipelines.text_encoder}


def linears(pipelines) -> dict[str, nn.Linear]:
    return {f"{root}.{name}": module for root, component in components(pipelines).items()
            for name, module in component.named_modules() if isinstance(module, nn.Linear)}


def weights_now(pipelines) -> dict[str, torch.Tensor]:
    return {path: module.weight.detach().clone() for path, module in linears(pipelines).items()}


def assert_exactly(pipelines, originals, terms: list[tuple[factory.LoraSpec, float]]) -> None:
    """Every Linear is its original plus the hand-merged terms that touch it (computed in float64), and untouched
    ones are their originals bit for bit: nothing of an earlier set is left."""
    for path, module in linears(pipelines).items():
        touching = [(spec.modules[path], scale) for spec, scale in terms if path in spec.modules]
        if not touching:
            assert torch.equal(module.weight, originals[path]), f"{path} keeps a residue"
            continue
        expected = originals[path].double()
        for lora, scale in touching:
            expected += scale * (lora.alpha / lora.rank) * (lora.up.double() @ lora.down.double())
        ulp = torch.finfo(torch.float32).eps
        torch.testing.assert_close(module.weight, expected.float(), rtol=4 * ulp, atol=4 * ulp * expected.abs().max().item(), msg=path)


def request(files, picks: list[tuple[int, float]], main: tuple[int, float] | None = None):
    """A MultiLoraPredictor request: extra_loras (and replicate_weights) from the picked files at their scales."""
    inputs = {"extra_loras": [str(files[i][0]) for i, _ in picks], "extra_lora_scales": [scale for _, scale in picks]}
    if main is not None:
        inputs.update(replicate_weights=str(files[main[0]][0]), lora_scale=main[1])
    return build_request(prompt="x", **inputs)


def test_switching_between_sets_of_3_and_8_leaves_exactly_the_set_asked_for(pipelines, lora_files, local):
    state = LoraState(pipelines)
    state.prepare(build_request(prompt="x"))
    originals = weights_now(pipelines)
    three = ([(1, 0.7), (2, -0.5)], (0, 1.25))  # the main LoRA and two extra ones
    eight = ([(2, 1.0), (3, 0.3), (4, 2.0), (5, -1.0), (6, 0.6), (7, 3.0), (8, 0.1), (9, 0.8)], None)
    other_three = ([(10, 0.9), (4, -0.25), (1, 1.5)], None)
    first_time: dict[str, dict[str, torch.Tensor]] = {}
    for name, (picks, main) in [("3", three), ("8", eight), ("other 3", other_three), ("3", three), ("8", eight)]:
        state.prepare(request(lora_files, picks, main))
        chosen = [(lora_files[i][1], scale) for i, scale in ([main] if main else []) + picks]
        assert_exactly(pipelines, originals, chosen)
        now = weights_now(pipelines)
        if name in first_time:  # the same set again gives the same weights bit for bit, whatever came between
            assert all(torch.equal(now[path], first_time[name][path]) for path in now), name
        first_time[name] = now
    state.prepare(build_request(prompt="x"))
    assert_exactly(pipelines, originals, [])


# --- fetching in parallel ---------------------------------------------------------------------------------


def specs_for(urls: list[str]) -> list[LoraSpec]:
    return [LoraSpec(url, 1.0, f"extra_loras[{index}]") for index, url in enumerate(urls)]


def test_a_requests_files_are_fetched_at_once(file_server, lora_files):
    """Each file's host answers after 1 s: fetched one after another, the third request would start 2 s after the
    first; fetched in parallel, all three start together."""
    arrivals: dict[str, float] = {}
    urls = []
    for index in range(3):
        path, data = f"/slow-{index}.safetensors", lora_files[index][0].read_bytes()

        def slow(request, path=path, data=data):
            arrivals.setdefault(path, time.monotonic())
            return file_reply(data, delay=1.0)

        file_server.route(re.escape(path), slow)
        urls.append(file_server.url + path)
    files = fetch_all(specs_for(urls))
    assert [file.read_bytes() for file in files] == [lora_files[i][0].read_bytes() for i in range(3)]
    assert max(arrivals.values()) - min(arrivals.values()) < 1.0, arrivals


def test_the_first_failure_stops_the_other_downloads_and_is_the_error_raised(file_server, lora_files):
    slow = file_server.add("/slow.safetensors", lora_files[0][0].read_bytes(), drip=0.05)  # minutes at this pace
    missing = f"{file_server.url}/missing.safetensors"
    started = time.monotonic()
    slow_too = file_server.add("/slow-too.safetensors", lora_files[1][0].read_bytes(), drip=0.05)
    with pytest.raises(UserError, match=r"^extra_loras\[1\]: .*404"):
        fetch_all(specs_for([slow, missing, slow_too]))
    assert time.monotonic() - started < 10  # the dripping download was stopped, not waited for


def test_a_cancel_ends_every_download(file_server, lora_files):
    urls = [file_server.add(f"/drip-{i}.safetensors", lora_files[i][0].read_bytes(), drip=0.05) for i in range(3)]
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(DownloadCancelled):
        fetch_all(specs_for(urls), cancelled=cancel.is_set)
    assert time.monotonic() - started < 10


# --- the converted LoRAs kept in memory, by bytes -------------------------------------------------------------


def test_converted_bytes_counts_every_tensor_once():
    shared = torch.zeros(4, 64)  # 1024 bytes, the A of two members of a fused layer
    deltas = {
        "transformer.a": LoraDelta(down=shared, up=torch.zeros(32, 4), factor=1.0),  # + 512
        "transformer.b": LoraDelta(down=shared, up=torch.zeros(32, 4, dtype=torch.bfloat16), factor=1.0),  # + 256
        "transformer.c": KronDelta(w1=(torch.zeros(2, 2),), w2=(torch.zeros(8, 4), torch.zeros(4, 16)), factor=1.0),  # + 16 + 128 + 256
    }
    assert converted_bytes(LoraWeights(deltas=deltas, matched=6, ignored={})) == 1024 + 512 + 256 + 16 + 128 + 256


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The files converted (load_lora called), in order: a spy that calls the real conversion."""
    seen: list[str] = []
    real = lora_state.load_lora

    def spy(path, **kwargs):
        seen.append(Path(path).name)
        return real(path, **kwargs)

    monkeypatch.setattr(lora_state, "load_lora", spy)
    return seen


def one_lora_bytes(pipelines, same_size_files) -> int:
    return converted_bytes(load_lora(same_size_files[0][0], input_name="x", transformer=pipelines.transformer("dev"),
                                                text_encoder=pipelines.text_encoder))


def test_the_least_recently_used_conversion_goes_when_the_bytes_run_out(pipelines, same_size_files, local, conversions):
    state = LoraState(pipelines, memory_bytes=int(2.5 * one_lora_bytes(pipelines, same_size_files)))  # two fit
    for index in (0, 1, 0, 2, 0, 1):
        state.prepare(request(same_size_files, [(index, 1.0)]))
    # 0 stays in use; 1 is the oldest when 2 comes, so it is converted again at the end
    assert conversions == ["lora-0.safetensors", "lora-1.safetensors", "lora-2.safetensors", "lora-1.safetensors"]


def test_a_request_over_the_budget_keeps_all_its_loras(pipelines, same_size_files, local, conversions):
    """Nine LoRAs where one fits: each is converted once, and the same request again converts nothing (they
    stay until another request needs the room)."""
    state = LoraState(pipelines, memory_bytes=int(1.5 * one_lora_bytes(pipelines, same_size_files)))
    nine = request(same_size_files, [(i, 0.5) for i in range(1, 9)], main=(0, 1.0))
    state.prepare(nine)
    assert sorted(conversions) == sorted(f"lora-{i}.safetensors" for i in range(9))
    state.prepare(nine)
    assert len(conversions) == 9
    state.prepare(request(same_size_files, [(10, 1.0)]))
    state.prepare(request(same_size_files, [(0, 1.0)]))
    assert conversions[9:] == ["lora-10.safetensors", "lora-0.safetensors"]


def test_the_old_count_setting_still_caps_the_number_kept(pipelines, same_size_files, local, conversions, monkeypatch):
    monkeypatch.setenv("FLUX_LORA_MEMORY_SLOTS", "1")
    state = LoraState(pipelines)  # the default byte budget (8 GiB) holds all of them
    for index in (0, 1, 0):
        state.prepare(request(same_size_files, [(index, 1.0)]))
    assert conversions == ["lora-0.safetensors", "lora-1.safetensors", "lora-0.safetensors"]
    monkeypatch.delenv("FLUX_LORA_MEMORY_SLOTS")
    state = LoraState(pipelines)
    for index in (0, 1, 0):
        state.prepare(request(same_size_files, [(index, 1.0)]))
    assert conversions[3:] == ["lora-0.safetensors", "lora-1.safetensors"]
