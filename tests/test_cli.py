"""script/predict's CLI (cog's -i syntax), run for real in a subprocess on the tiny weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.fixtures.servers"]


def run_cli(*args: str, cwd: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(root / "script" / "_predict.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_predict_writes_outputs_in_the_working_directory(tmp_path, tiny_weights):
    photo = tmp_path / "photo.png"
    Image.effect_noise((300, 200), 40).convert("RGB").save(photo)
    result = run_cli(
        "-i", "prompt=a photo of TOK", "-i", "image=@photo.png", "-i", "num_inference_steps=2",
        "-i", "num_outputs=2", "-i", "output_format=jpg", "-i", "disable_safety_checker=true", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TINY random test weights" in result.stdout + result.stderr
    outputs = sorted(p.name for p in tmp_path.glob("output.*"))
    assert outputs == ["output.0.jpg", "output.1.jpg"]
    assert Image.open(tmp_path / "output.0.jpg").size == (304, 208)


def test_file_input_as_a_url(tmp_path, tiny_weights, file_server):
    from io import BytesIO

    buffer = BytesIO()
    Image.effect_noise((320, 240), 40).convert("RGB").save(buffer, "PNG")
    url = file_server.add("/photo.png", buffer.getvalue())
    result = run_cli("-i", "prompt=x", "-i", f"image={url}", "-i", "num_inference_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "output.0.webp").size == (320, 240)


def test_output_dir_option(tmp_path, tiny_weights):
    result = run_cli("-i", "prompt=x", "-i", "num_inference_steps=1", "-i", "megapixels=0.25", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out" / "output.0.webp").size == (512, 512)


def test_bad_inputs_are_refused_before_loading_models(tmp_path):
    cases = [
        (["-i", "prompt=x", "-i", "num_outputs=9"], "num_outputs: 9 is greater than the maximum of 4"),
        (["-i", "prompt=x", "-i", "colour=red"], "colour: unknown input"),
        (["-i", "prompt=x", "-i", "image=@missing.png"], "does not exist"),
        (["-i", "num_outputs=1"], "prompt=... is required"),
        (["-i", "prompt=x", "-i", "seed=abc"], "seed: expected a whole number"),
    ]
    for args, message in cases:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])


def test_predict_builds_and_validates_the_class_cog_yaml_names(tmp_path):
    """A copy of the project whose cog.yaml deploys LegacyPredictor: script/predict follows it, schema included."""
    copy = tmp_path / "project"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", ".cache", "tests", "*_cache", "__pycache__"))
    config = (copy / "cog.yaml").read_text()
    assert 'run: "predict.py:Predictor"' in config
    (copy / "cog.yaml").write_text(config.replace("predict.py:Predictor", "predict.py:LegacyPredictor"))
    cases = [
        (["-i", "prompt=x", "-i", "lora_scale=2.5"], "lora_scale: 2.5 is greater than the maximum of 2"),
        (["-i", "prompt=x", "-i", "go_fast=true"], "go_fast: unknown input"),
    ]
    for args, message in cases:
        result = run_cli(*args, cwd=tmp_path, root=copy)
        assert "Predictor: predict.py:LegacyPredictor (from cog.yaml)" in result.stderr, result.stderr[-500:]
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])
    # this repo's own cog.yaml deploys Predictor, whose lora_scale goes up to 3
    result = run_cli("-i", "prompt=x", "-i", "lora_scale=3.5", cwd=tmp_path)
    assert "Predictor: predict.py:Predictor (from cog.yaml)" in result.stderr
    assert "lora_scale: 3.5 is greater than the maximum of 3" in result.stderr


def test_a_list_input_takes_one_entry_per_flag_or_a_json_list():
    """MultiLoraPredictor's extra_loras and extra_lora_scales, as `cog predict -i` users write them."""
    from script._predict import parse_inputs
    from script._schema import openapi_document
    from script.cog_inputs import load_predictor

    schema = openapi_document(load_predictor("predict.py:MultiLoraPredictor"))
    properties = schema["components"]["schemas"]["Input"]["properties"]
    flags = ["extra_loras=owner/a", "extra_loras=huggingface.co/owner/b", "extra_lora_scales=[0.8, -0.5]", "extra_lora_scales=1"]
    assert parse_inputs(flags, properties) == {"extra_loras": ["owner/a", "huggingface.co/owner/b"], "extra_lora_scales": [0.8, -0.5, 1.0]}
    assert parse_inputs(['extra_loras=["owner/a", "owner/b"]'], properties) == {"extra_loras": ["owner/a", "owner/b"]}
    with pytest.raises(SystemExit, match="extra_lora_scales: expected a number"):
        parse_inputs(["extra_lora_scales=strong"], properties)
    with pytest.raises(SystemExit, match="is not a JSON list"):
        parse_inputs(["extra_loras=[owner/a"], properties)
