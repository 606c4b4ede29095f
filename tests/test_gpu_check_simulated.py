"""script/gpu_check --smoke on a simulated H100 (tests/fixtures/simulated_gpu) at full size: the check's main() runs
every stage through the product's CUDA code path with the real FLUX.1 sizes (19 double and 38 single blocks, T5 with
24 layers) and the card's memory, so the day a GPU is lent it does not die on a line no CPU run reaches.

Nothing compiles on the simulation (no Inductor): FLUX_COMPILE=0, as every simulated run sets it, leaves out the
compiled rows, and the check records that and why. Times and values are the simulation's and mean nothing (values
read back are zeros; the check computes no figure from values): what is checked is that every stage ran and wrote
its figures, at full size, within the card's memory, and that the run cleaned up after itself."""

from __future__ import annotations

import json
import logging
import math
import tempfile

from flux.fast.cards import card
from tests.fixtures.simulated_gpu import simulated_gpu
from tests.fixtures.simulated_requests import simulation_settings

VARIANTS = ("dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8")
DEV_BF16_GIB = 22.2  # the full-size dev transformer in bf16 alone (flux/fast/sizes.py): every row holds more


def phase_functions() -> list[object]:
    """What the check's phase clocks wrap (script/_benchmark_phases.py), as the classes hold them."""
    from weights.libraries import prepare_libraries

    prepare_libraries()  # before diffusers, as the check and the server import it
    from diffusers import AutoencoderKL, FluxPipeline

    import flux.generate
    import flux.pipelines
    from flux.lora_state import LoraState
    from safety.checker import SafetyChecker
    from weights.synthetic.store import SyntheticStore

    return [FluxPipeline.encode_prompt, AutoencoderKL.decode, SafetyChecker.check, SafetyChecker.load, LoraState.prepare,
            flux.generate.save_images, flux.pipelines.flux_transformer, SyntheticStore.shared_components]


def run_check_on_h100(tmp_path) -> list[dict]:
    """main() as script/gpu_check runs it, inside the simulation; its JSON records."""
    from script import _gpu_check as gpu_check

    root, functions = logging.getLogger(), phase_functions()
    handlers, level = root.handlers[:], root.level  # the check points the root logger at stdout, as a script may
    try:
        with simulation_settings(tmp_path), simulated_gpu("H100") as gpu:
            assert gpu_check.main(["--smoke", "--out", str(tmp_path / "out")]) == 0
            assert gpu.peak <= gpu.memory.capacity
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert phase_functions() == functions  # every phase clock put back
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_gpu_check_runs_every_stage_at_full_size_on_a_simulated_h100(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the check makes its scratch folder
    records = run_check_on_h100(tmp_path)
    h100 = card("H100")

    assert not list(scratch.glob("gpu-check-*"))  # its safety models and LoRAs (1.4 GB at full size) gone with it
    stages = [record["stage"] for record in records]
    assert stages[0] == "device" and stages[-1] == "done" and records[-1]["smoke"]
    assert set(stages) == {"device", "setup", "row", "switch", "vae", "done"}
    device = records[0]
    assert device["name"] == h100.name and device["capability"] == "9.0" and device["alloc_conf"] == "expandable_segments:True"
    assert device["total_gib"] == round(h100.total_gib, 2)

    setup = [record for record in records if record["stage"] == "setup"]
    phases = {record.get("phase") for record in setup}
    assert {"safety files", "text encoders + VAE", "bf16 builds", "fp8 builds", "safety load"} <= phases
    assert next(record["resident"] for record in setup if "resident" in record)  # what the H100's plan kept
    skipped = {record["skipped"]: record["reason"] for record in setup if "skipped" in record}
    assert skipped == {"dev-fp8 compiled": "--no-compile or FLUX_COMPILE=0", "schnell-fp8 compiled": "--no-compile or FLUX_COMPILE=0"}

    rows = [record for record in records if record["stage"] == "row"]
    assert sorted((row["variant"], row["lora"]) for row in rows) == sorted((v, lora) for v in VARIANTS for lora in (False, True))
    for row in rows:
        assert (row["size"], row["steps"], row["runs"], row["warm_runs"]) == ([1024, 1024], 1, 1, 0)
        assert not row["compiled"] and not row["compile_failed"] and row["graphs_compiled"] == 0
        assert DEV_BF16_GIB < row["peak_gib"] <= h100.total_gib, row  # full size, within the card
        assert all(math.isfinite(value) and value >= 0 for value in row["median_s"].values())
        assert {"text", "denoise", "vae", "safety", "total"} <= set(row["median_s"])
    assert {record["variant"] for record in records if record["stage"] == "switch"} == set(VARIANTS)
    vae = next(record for record in records if record["stage"] == "vae")
    assert vae["side"] == 1440 and 0 < vae["peak_above_models_gib"] < h100.total_gib and "out_of_memory" not in vae

    printed = capsys.readouterr().out
    assert "setup: no compiled rows for dev-fp8 (--no-compile or FLUX_COMPILE=0)" in printed
    assert "(--smoke: each stage once, the times are not measurements)" in printed
