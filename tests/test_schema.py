"""The OpenAPI schema matches the Replicate seed pages, is current, and cog.yaml is valid."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from flux.request import LIMITS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "schemas"  # origins: its README.md
COMPARED = ["type", "format", "default", "minimum", "maximum", "enum", "description", "title", "x-order"]


def committed_schemas() -> dict:
    return json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]


def resolved_inputs(schemas: dict | None = None) -> dict:
    """Our Input properties with cog's allOf/$ref enums merged in, as Replicate's page shows them."""
    schemas = schemas or committed_schemas()
    properties = {}
    for name, prop in schemas["Input"]["properties"].items():
        prop = dict(prop)
        for ref in prop.pop("allOf", []):
            prop = {**schemas[ref["$ref"].rsplit("/", 1)[1]], **prop}
        properties[name] = prop
    return properties


def test_schema_file_is_current():
    result = subprocess.run([sys.executable, "script/_schema.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def variant_schemas(ref: str) -> dict:
    sys.path.insert(0, str(ROOT / "script"))
    from _schema import openapi_document
    from cog_inputs import load_predictor

    return openapi_document(load_predictor(ref))["components"]["schemas"]


def assert_matches_seed(schemas: dict, seed: dict, hidden_order: int) -> None:
    ours = resolved_inputs(schemas)
    hidden = ours.pop("replicate_weights")
    assert hidden["x-order"] == hidden_order and hidden["type"] == "string" and hidden.get("nullable") is True
    assert sorted(ours) == sorted(seed["properties"])
    for name, expected in seed["properties"].items():
        for key in COMPARED:
            assert ours[name].get(key) == expected.get(key), f"{name}.{key}"
    assert schemas["Input"]["required"] == seed["required"]


def test_input_schema_matches_trained_lora_seed_property_by_property():
    """Seeds 000, 003 and 004 (the committed schema file is this one, as cog.yaml deploys Predictor)."""
    seed = json.loads((REFERENCE / "trained-lora.input.json").read_text())
    assert_matches_seed(committed_schemas(), seed, hidden_order=17)


def test_fast_predictor_matches_seed_001():
    """Seed 001 is the trained-LoRA table with go_fast on by default."""
    seed = json.loads((REFERENCE / "trained-lora.input.json").read_text())
    seed["properties"]["go_fast"]["default"] = True
    assert_matches_seed(variant_schemas("predict.py:FastPredictor"), seed, hidden_order=17)
    page = (REFERENCE / "seed-001-page.txt").read_text()
    assert "go_fast |\nboolean\n|\nTrue\n" in page  # the seed page itself says so


def test_legacy_predictor_matches_seed_002():
    seed = json.loads((REFERENCE / "legacy-fine-tuner.input.json").read_text())
    assert_matches_seed(variant_schemas("predict.py:LegacyPredictor"), seed, hidden_order=12)


def test_output_schema_matches_seed():
    seed = json.loads((REFERENCE / "output.json").read_text())
    assert committed_schemas()["Output"] == seed


def test_enum_components_follow_cog_rules():
    schemas = committed_schemas()
    for name in ("aspect_ratio", "model", "output_format", "megapixels"):
        prop = schemas["Input"]["properties"][name]
        assert prop["allOf"] == [{"$ref": f"#/components/schemas/{name}"}]
        assert schemas[name]["title"] == name and schemas[name]["description"] == "An enumeration."
        assert schemas[name]["type"] == "string"


def test_request_limits_agree_with_predict_literals():
    ours = resolved_inputs()
    for name, (low, high) in LIMITS.items():
        assert (ours[name]["minimum"], ours[name]["maximum"]) == (low, high), name


def test_cog_yaml_is_valid_against_cogs_config_schema():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads((REFERENCE / "cog-config-schema-v1.0.json").read_text()))
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert config["predict"] == "predict.py:Predictor"
    # torch 2.11.0 wheels are built for CUDA 12.6, 12.8 and 13.0
    assert build["cuda"] in ("12.6", "12.8", "13.0")


def test_one_pinned_list_and_cog_uses_it():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert config["build"]["python_requirements"] == "requirements.txt"
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in lines), "every dependency is pinned"
    assert "torch==2.11.0" in lines
