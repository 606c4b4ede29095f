"""script/gpu_check --cpu --quick: every stage of the GPU check runs on the 1/1/1 real-width synthetic model, so
the script cannot rot where there is no GPU. The figures themselves say nothing about a GPU; only that each
stage ran and wrote what it measured."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_on_cpu_prints_every_row_and_writes_every_figure(tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FLUX_")}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    result = subprocess.run([str(ROOT / "script" / "gpu_check"), "--cpu", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=environment, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = [record["stage"] for record in records]
    assert stages[0] == "device" and stages[-1] == "done"
    rows = [record for record in records if record["stage"] == "row"]
    assert sorted({(r["variant"], r["lora"]) for r in rows}) == sorted(
        (variant, lora) for variant in ("dev-bf16", "dev-fp8", "schnell-bf16", "schnell-fp8") for lora in (False, True))
    for row in rows:
        assert row["size"] == [128, 128] and row["graphs_compiled"] == 0
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
