"""The OpenAPI schema matches the Replicate seed pages, is current, and cog.yaml is valid."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from errors import UserError
from flux.request import LEGACY_LIMITS, LIMITS, MODELS, OUTPUT_FORMATS, build_request
from flux.sizes import ASPECT_RATIOS, CUSTOM_MAX, CUSTOM_MIN, MEGAPIXELS

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


from script._schema import openapi_document  # noqa: E402
from script.cog_inputs import load_predictor, predict_with_defaults  # noqa: E402


def variant_schemas(ref: str) -> dict:
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


VARIANTS = ["predict.py:Predictor", "predict.py:FastPredictor", "predict.py:LegacyPredictor", "predict.py:MultiLoraPredictor"]
# Where a variant's schema legitimately differs from flux/request.py's LIMITS and build_request's defaults, as its
# seed page does. Anything not listed here must agree.
STATED_DEFAULTS = {
    "predict.py:FastPredictor": {"go_fast": True},  # seed 001
    "predict.py:LegacyPredictor": {"guidance_scale": 3.5},  # seed 002
}
STATED_LIMITS = {"predict.py:LegacyPredictor": {"lora_scale": (-1, 2)}}  # seed 002: lora_scale le=2
CHOICES = {"aspect_ratio": ASPECT_RATIOS, "megapixels": MEGAPIXELS, "model": list(MODELS), "output_format": OUTPUT_FORMATS}


@pytest.mark.parametrize("ref", VARIANTS)
def test_every_bound_choice_and_default_agrees_with_request_and_sizes(ref):
    ours = resolved_inputs(variant_schemas(ref))
    limits = load_predictor(ref).limits
    request_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(build_request).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert set(ours) <= set(request_defaults) | {"prompt"}, "every input reaches build_request"
    expected_limits = {**LIMITS, **STATED_LIMITS.get(ref, {})}
    assert dict(limits) == expected_limits, "the class passes exactly its page's bounds to build_request"
    expected_defaults = {**request_defaults, **STATED_DEFAULTS.get(ref, {})}
    for name, prop in ours.items():
        bounds = (prop.get("minimum"), prop.get("maximum"))
        if name in ("width", "height"):
            assert bounds == (CUSTOM_MIN, CUSTOM_MAX), name
        elif name in expected_limits:
            assert bounds == expected_limits[name], name
        else:
            assert bounds == (None, None), f"{name} has a bound that flux/request.py does not know"
        assert prop.get("enum") == CHOICES.get(name), name
        if name != "prompt":
            # cog leaves a None default out of the schema
            assert prop.get("default") == expected_defaults[name], name


def test_stated_differences_are_the_seed_pages_own():
    trained = json.loads((REFERENCE / "trained-lora.input.json").read_text())["properties"]
    legacy = json.loads((REFERENCE / "legacy-fine-tuner.input.json").read_text())["properties"]
    assert (trained["lora_scale"]["maximum"], legacy["lora_scale"]["maximum"]) == (3, 2)
    assert (trained["guidance_scale"]["default"], legacy["guidance_scale"]["default"]) == (3, 3.5)
    assert trained["go_fast"]["default"] is False
    assert {k for k in LIMITS if LEGACY_LIMITS[k] != LIMITS[k]} == {"lora_scale"}


class RecordingGenerator:
    """Stands in for the model (not under test here): keeps the request that validation produced."""

    def run(self, request):
        self.request = request
        return []


def called(ref: str, **inputs):
    """run() of a variant, in process, with the model replaced by a recorder."""
    predictor = load_predictor(ref)()
    predictor.generator = RecordingGenerator()
    predict_with_defaults(predictor, prompt="x", **inputs)
    return predictor.generator.request


def test_in_process_calls_keep_to_the_schema_of_the_class_called():
    """coglet refuses lora_scale 2.5 for LegacyPredictor by its schema; an in-process call must too."""
    assert called("predict.py:Predictor", replicate_weights="owner/model", lora_scale=2.5).main_lora_scale == 2.5
    with pytest.raises(UserError, match=r"^lora_scale: 2.5 is out of range; use -1 to 2"):
        called("predict.py:LegacyPredictor", replicate_weights="owner/model", lora_scale=2.5)
    assert called("predict.py:LegacyPredictor").guidance_scale == 3.5
    assert called("predict.py:FastPredictor").go_fast is True
    assert called("predict.py:Predictor").go_fast is False


def test_cog_yaml_is_valid_against_cogs_config_schema():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads((REFERENCE / "cog-config-schema-v1.0.json").read_text()))
    build = config["build"]
    assert build["gpu"] is True and build["python_version"] == "3.11"
    assert config["run"] == "predict.py:Predictor" and "predict" not in config  # cog >= 0.20: one or the other
    # torch 2.11.0 wheels are built for CUDA 12.6, 12.8 and 13.0
    assert build["cuda"] in ("12.6", "12.8", "13.0")


def test_cog_loads_every_class_without_deprecation_warnings():
    """Through cog's own loader, in a fresh process (it re-imports predict.py): BaseRunner and run(), no old names."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from cog.predictor import load_predictor_from_ref\n"
        f"    for ref in {VARIANTS!r}:\n"
        "        load_predictor_from_ref(ref)\n"
        "print([f'{w.category.__name__}: {w.message}' for w in caught])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_one_pinned_list_and_cog_uses_it():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert config["build"]["python_requirements"] == "requirements.txt"
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all("==" in line for line in lines), "every dependency is pinned"
    assert "torch==2.11.0" in lines


@pytest.mark.parametrize("name", ["Predictor", "FastPredictor", "LegacyPredictor", "MultiLoraPredictor"])
def test_each_class_states_its_go_fast_default_as_its_signature_does(name):
    """setup() reads the plain class attribute; cog reads the signature. They must agree (Legacy has no go_fast:
    off, like its page)."""
    import predict

    cls = getattr(predict, name)
    parameter = inspect.signature(cls.run).parameters.get("go_fast")
    signature_default = parameter.default.default if parameter is not None else False
    assert cls.go_fast_default is signature_default
    assert cls.has_go_fast is (parameter is not None)


def test_multi_lora_predictor_is_the_trained_lora_page_with_two_lists_for_the_extra_loras():
    """Every input of Predictor but extra_lora/extra_lora_scale, as Predictor states it, in the same order; in their
    place two lists as cog writes a list input (type array, items), the scales with the bounds of a LoRA scale
    (JSON Schema applies minimum/maximum to numbers only: flux/request.py checks each entry). Neither list is
    required nor nullable (cog's rule for an Optional list)."""
    ours = resolved_inputs(variant_schemas("predict.py:MultiLoraPredictor"))
    trained = resolved_inputs(variant_schemas("predict.py:Predictor"))
    lists = {name: ours.pop(name) for name in ("extra_loras", "extra_lora_scales")}
    replaced = {name: trained.pop(name) for name in ("extra_lora", "extra_lora_scale")}
    assert list(ours) == list(trained)
    for name, prop in ours.items():
        # the page's "we apply a 1.5x multiplier" is not this server's default (FLUX_GO_FAST_LORA_MULTIPLIER=1)
        differs = {"description"} if name == "lora_scale" else set()
        assert {k: v for k, v in prop.items() if k not in differs} == {k: v for k, v in trained[name].items() if k not in differs}, name
    assert [prop["x-order"] for prop in lists.values()] == [prop["x-order"] for prop in replaced.values()] == [19, 20]
    assert lists["extra_loras"]["type"] == "array" and lists["extra_loras"]["items"] == {"type": "string"}
    assert lists["extra_lora_scales"]["items"] == {"type": "number"}
    assert (lists["extra_lora_scales"]["minimum"], lists["extra_lora_scales"]["maximum"]) == LIMITS["extra_lora_scales"] == (-1, 3)
    assert all("default" not in prop and "nullable" not in prop for prop in lists.values())
    assert variant_schemas("predict.py:MultiLoraPredictor")["Input"]["required"] == ["prompt"]


def test_the_multi_lora_schema_file_is_committed_and_the_check_covers_it(tmp_path, monkeypatch, capsys):
    """script/schema writes .cog/schemas/MultiLoraPredictor.json (a test server for the class is given it) and
    --check fails when it is stale, as for the deployed class's file."""
    from script import _schema

    committed = _schema.own_schema_file("MultiLoraPredictor")
    assert json.loads(committed.read_text()) == openapi_document(load_predictor("predict.py:MultiLoraPredictor"))
    stale = tmp_path / "MultiLoraPredictor.json"
    stale.write_text(committed.read_text().replace('"extra_loras"', '"extra_lora"', 1))
    monkeypatch.setattr(_schema, "own_schema_file", lambda name: stale)
    monkeypatch.setattr(sys, "argv", ["script/_schema.py", "--check"])
    assert _schema.main() == 1
    assert "MultiLoraPredictor.json is stale" in capsys.readouterr().err
