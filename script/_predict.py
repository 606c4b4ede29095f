"""`script/predict -i prompt="a photo of TOK" [-i image=@photo.png] [-o DIR]`: one prediction, like `cog predict`.

Runs the predictor class that cog.yaml names, in this process (no Docker). Values are typed and checked against that
class's input schema, `@path` passes a file, and outputs are written as output.{i}.{ext} in the output directory
(default: the working directory). A list input (MultiLoraPredictor's extra_loras) takes one entry per -i, or a JSON
list: `-i extra_loras=owner/a -i extra_loras=owner/b`, `-i 'extra_lora_scales=[0.8, 0.5]'`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_inputs(pairs: list[str], properties: dict) -> dict:
    inputs: dict = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected name=value")
        if name not in properties:
            raise SystemExit(f"-i {name}: unknown input; valid inputs: {', '.join(properties)}")
        schema = properties[name]
        if schema.get("type") == "array":  # -i name=entry, once per entry, or -i name=[...] (JSON)
            inputs.setdefault(name, []).extend(typed_list(name, raw, schema.get("items", {})))
        else:
            inputs[name] = typed_value(name, raw, schema)
    return inputs


def typed_list(name: str, raw: str, items: dict) -> list:
    if not raw.lstrip().startswith("["):
        return [typed_value(name, raw, items)]
    try:
        return json.loads(raw)  # its entries' types are checked with the rest of the inputs (validate)
    except json.JSONDecodeError:
        raise SystemExit(f"-i {name}: {raw!r} is not a JSON list; give one entry per -i instead") from None


def typed_value(name: str, raw: str, schema: dict) -> object:
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        if not path.is_file():
            raise SystemExit(f"-i {name}: file {path} does not exist")
        return path.resolve()
    if schema.get("format") == "uri" and raw.startswith(("http://", "https://")):
        return download(name, raw)
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        expected = "a whole number" if kind == "integer" else "a number"
        raise SystemExit(f"-i {name}: expected {expected}, got {raw!r}") from None
    if kind == "boolean":
        if raw.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"-i {name}: expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    return raw


def download(name: str, url: str, max_bytes: int = 100 * 2**20) -> Path:
    """A file input given as a URL, as `cog predict` accepts: fetched once into a temp file."""
    import tempfile

    import requests

    suffix = Path(url.split("?", 1)[0]).suffix[:8]
    target = Path(tempfile.mkdtemp(prefix="flux-input-")) / f"{name}{suffix}"
    atexit.register(shutil.rmtree, target.parent, ignore_errors=True)  # outputs are copied out; the input can go
    try:
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            response.raise_for_status()
            with target.open("wb") as file:
                for chunk in response.iter_content(1 << 20):
                    file.write(chunk)
                    if file.tell() > max_bytes:
                        raise SystemExit(f"-i {name}: the file at that URL is over {max_bytes >> 20} MB")
    except requests.RequestException as error:
        raise SystemExit(f"-i {name}: could not download it ({type(error).__name__})") from None
    return target


def validate(inputs: dict, schema: dict) -> None:
    """Check values against the input schema before the models load, as the cog server does (its 422)."""
    import jsonschema

    document = {"$ref": "#/components/schemas/Input", "components": schema["components"]}
    as_json = {name: str(value) if isinstance(value, Path) else value for name, value in inputs.items()}
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(document).iter_errors(as_json))
    if error is not None:
        name = error.path[0] if error.path else "input"
        raise SystemExit(f"-i {name}: {error.message}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Run one prediction in this process, like `cog predict`.")
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE", help="an input; @path for files")
    parser.add_argument("-o", "--output-dir", default=".", help="where output.{i}.{ext} are written (default: .)")
    args = parser.parse_args()

    from script._schema import openapi_document
    from script.cog_inputs import load_predictor, predict_with_defaults, predictor_ref

    ref = predictor_ref()  # the class cog.yaml deploys, as `cog predict` would
    predictor_class = load_predictor(ref)  # predict.py needs no torch to import
    print(f"Predictor: {ref} (from cog.yaml)", file=sys.stderr)
    schema = openapi_document(predictor_class)  # its own schema, even when .cog/openapi_schema.json is stale
    inputs = parse_inputs(args.input, schema["components"]["schemas"]["Input"]["properties"])
    if "prompt" not in inputs:
        raise SystemExit('-i prompt=... is required, e.g. script/predict -i prompt="a photo of TOK"')
    validate(inputs, schema)

    # the person at this terminal owns the machine: local LoRA and image files are fine here (servers default to none)
    os.environ.setdefault("FLUX_LORA_LOCAL_DIRS", os.sep)
    os.environ.setdefault("FLUX_INPUT_LOCAL_DIRS", os.sep)
    from errors import UserError

    started = time.perf_counter()
    predictor = predictor_class()
    predictor.setup()
    print(f"Setup took {time.perf_counter() - started:.2f}s", file=sys.stderr)
    try:
        outputs = predict_with_defaults(predictor, **inputs)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, output in enumerate(outputs):
        target = out_dir / f"output.{index}{Path(output).suffix}"
        shutil.copyfile(output, target)
        print(f"Written output to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
