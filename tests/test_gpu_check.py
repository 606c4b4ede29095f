"""script/gpu_check --cpu --quick: every stage of the GPU check runs on the 1/1/1 real-width synthetic model, so
the script cannot rot where there is no GPU. The figures themselves say nothing about a GPU; only that each
stage ran and wrote what it measured."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu_prints_every_row_and_writes_every_figure(tmp_path):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("FLUX_") and key != "PYTORCH_CUDA_ALLOC_CONF"}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    result = subprocess.run([str(ROOT / "script" / "gpu_check"), "--cpu", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=environment, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = [record["stage"] for record in records]
    assert stages[0] == "device" and stages[-1] == "done"
    assert records[0]["alloc_conf"] == "expandable_segments:True"  # cog.yaml's, as the image runs
    rows = [record for record in records if record["stage"] == "row"]
    assert sorted({(r["variant"], r["lora"]) for r in rows}) == sorted(
        (variant, lora) for variant in ("dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8") for lora in (False, True))
    for row in rows:
        assert row["size"] == [128, 128] and row["graphs_compiled"] == 0
        assert not row["compiled"] and not row["compile_failed"]
        assert all(math.isfinite(value) and value >= 0 for value in row["median_s"].values())
        assert row["median_s"]["denoise"] > 0 and row["median_s"]["vae"] > 0 and row["median_s"]["safety"] > 0
        assert row["median_s"]["lora"] > 0 or not row["lora"]  # a row without one may still unfuse the last
    switches = {record["variant"] for record in records if record["stage"] == "switch"}
    assert switches == {"dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8"}
    phases = {record.get("phase") for record in records if record["stage"] == "setup"}
    assert {"bf16 builds", "text encoders + VAE", "safety load", "build dev-fp8", "build schnell-fp8"} <= phases
    assert any(record["stage"] == "vae" and record["seconds"] > 0 for record in records)
    for variant in ("dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8"):
        assert any(line.startswith(variant) for line in result.stdout.splitlines()), variant
    assert "switch dev-fp8" in result.stdout


# --- pieces of the check, without running it -------------------------------------------------------------------

def test_cog_yamls_environment_is_set_before_torch_unless_the_user_set_it(monkeypatch):
    from script import _gpu_check as gpu_check
    from script.cog_inputs import cog_environment

    assert cog_environment() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}  # cog.yaml is the source
    environ = {}
    assert gpu_check.set_cog_environment(environ) == environ == cog_environment()
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert gpu_check.set_cog_environment(mine) == {} and mine == {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(SystemExit):
        gpu_check.main(["--no-such-option"])  # set before the arguments are even read
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_no_compile_and_flux_compile_0_leave_out_the_compiled_rows(monkeypatch):
    """The user's FLUX_COMPILE=0 is read before the check sets it (to 0) for its own setup."""
    from script import _gpu_check as gpu_check

    plans = []
    monkeypatch.setattr(gpu_check, "run", lambda plan, out: plans.append(plan))  # the options, not the run
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.delenv("FLUX_COMPILE", raising=False)
    gpu_check.main(["--cpu"])
    gpu_check.main(["--cpu", "--no-compile", "--smoke"])
    monkeypatch.setenv("FLUX_COMPILE", "0")
    gpu_check.main(["--cpu"])
    assert [plan.compile for plan in plans] == [True, False, False]
    on_gpu = [dataclasses.replace(plan, cpu=False) for plan in plans]
    assert [plan.no_compile_reason() for plan in on_gpu] == [None, *["--no-compile or FLUX_COMPILE=0"] * 2]
    assert (on_gpu[0].steps, on_gpu[0].repeats, on_gpu[0].warm_runs) == ({"dev": 28, "schnell": 4}, 3, 1)
    assert (on_gpu[1].steps, on_gpu[1].repeats, on_gpu[1].warm_runs) == ({"dev": 1, "schnell": 1}, 1, 0)  # --smoke


def _tool(folder: Path, script: str) -> None:
    folder.mkdir()
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (folder / "nvidia-smi").chmod(0o755)


def test_nvidia_smi_is_optional(tmp_path, monkeypatch):
    from script._gpu_check import nvidia_smi_line

    monkeypatch.setenv("PATH", str(tmp_path))  # a container with the driver's libraries but not the tool
    assert nvidia_smi_line() is None
    _tool(tmp_path / "broken", "echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9")
    monkeypatch.setenv("PATH", str(tmp_path / "broken"))
    assert nvidia_smi_line() is None
    _tool(tmp_path / "working", 'echo "NVIDIA H100 80GB HBM3, 570.124.06, 81559 MiB, 700.00 W, 1980 MHz"')
    monkeypatch.setenv("PATH", str(tmp_path / "working"))
    assert nvidia_smi_line() == "NVIDIA H100 80GB HBM3, 570.124.06, 81559 MiB, 700.00 W, 1980 MHz"


def test_a_row_is_labelled_compiled_only_when_its_blocks_are():
    from flux.fast.compile import CompileReport, compile_transformer
    from script._gpu_check import Compiled
    from weights.tiny.flux import tiny_transformer

    transformer = tiny_transformer(guidance_embeds=True)
    assert Compiled.of(transformer).label("dev-fp8") == "dev-fp8"  # an eager row
    failed = Compiled.of(transformer, CompileReport(compiled=False))  # what compile_for_serving says after a failure
    assert failed == Compiled(compiled=False, failed=True) and failed.label("dev-fp8") == "dev-fp8 eager (compile failed)"
    compile_transformer(transformer, backend="eager")
    assert Compiled.of(transformer, CompileReport(compiled=True)).label("dev-fp8") == "dev-fp8 compiled"


def test_a_compiled_row_whose_compile_failed_says_so(predictor, monkeypatch, tmp_path, capsys):
    """Inductor failing on the lent machine: compile_for_serving falls back to eager, and the row must not be
    reported as compiled."""
    from flux.fast import compile as fast_compile
    from script import _gpu_check as gpu_check

    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("inductor could not build a kernel")

    monkeypatch.setattr(fast_compile, "compile_wanted", lambda device: True)  # the CUDA gate, tested elsewhere
    monkeypatch.setattr(fast_compile, "compile_transformer",
                        lambda transformer, **_: transformer.compile_repeated_blocks(backend=broken_backend, dynamic=True))
    monkeypatch.setenv("FLUX_COMPILE_CACHE_DIR", str(tmp_path / "compile-cache"))
    monkeypatch.setenv("FLUX_COMPILE", "0")  # as the check's setup leaves it; compile_stage turns it on
    report = gpu_check.Report(tmp_path)
    compile_report = gpu_check.compile_stage(report, predictor.generator, "dev")
    rows = gpu_check.Rows(report, gpu_check.Plan(cpu=True, quick=True), predictor.generator, [])
    try:
        rows.row("dev", True, compile_report, None)
    finally:
        rows.clock.restore()

    row = json.loads((tmp_path / "gpu_check.json").read_text())[-1]
    assert (row["variant"], row["compiled"], row["compile_failed"]) == ("dev-fp8", False, True)
    assert capsys.readouterr().out.splitlines()[-1].startswith("dev-fp8 eager (compile failed)")


def test_the_phase_clock_puts_back_what_it_wrapped():
    """Its restore() used to put the wrappers back in place of the originals: the check's clocks stayed on the
    product's classes for the rest of the process (the simulated-GPU test runs the check in-process)."""
    from types import SimpleNamespace

    from script._benchmark_phases import PhaseClock

    class Owner:
        def method(self):
            return "method"

        @classmethod
        def build(cls):
            return cls

    class Child(Owner):  # inherits `method`: nothing of its own to put back
        pass

    module = SimpleNamespace(function=lambda: "function")
    saved = (vars(Owner)["method"], vars(Owner)["build"], module.function)
    clock = PhaseClock(lambda: None)
    for owner, name in ((Owner, "method"), (Owner, "build"), (module, "function"), (Child, "method")):
        clock.wrap(owner, name, name)
    assert (Owner().method(), Owner.build(), module.function(), Child().method()) == ("method", Owner, "function", "method")
    assert {phase for phase, _, _ in clock.marks} == {"method", "build", "function"}
    clock.restore()
    assert (vars(Owner)["method"], vars(Owner)["build"], module.function) == saved and "method" not in vars(Child)
