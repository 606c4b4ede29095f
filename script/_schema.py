"""Writes .cog/openapi_schema.json from the run() signature in predict.py, following the rules cog's CLI applies.

cog build would normally generate this file; without Docker we generate it from the same source of truth, and
coglet validates inputs against it. It also writes .cog/schemas/<Class>.json for each class in OWN_SCHEMAS,
whose inputs no hosted page states (so the committed file is what reviews a change to them, and what a test
server for that class is given). `--check` exits 1 when any committed file is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from script.cog_inputs import ROOT, load_predictor, predictor_ref  # noqa: E402

SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"
OWN_SCHEMAS = ("MultiLoraPredictor",)  # classes of predict.py whose schema is committed beside the deployed one


def own_schema_file(class_name: str) -> Path:
    return ROOT / ".cog" / "schemas" / f"{class_name}.json"


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _unwrap_optional(annotation: object) -> tuple[object, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _type_schema(annotation: object) -> dict:
    import cog

    if annotation is str:
        return {"type": "string"}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number"}
    if annotation in (cog.Path, cog.File):
        return {"type": "string", "format": "uri"}
    if annotation is cog.Secret:
        return {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True}
    if typing.get_origin(annotation) is list:
        return {"type": "array", "items": _type_schema(typing.get_args(annotation)[0])}
    raise TypeError(f"no schema rule for {annotation!r}")


def _title(name: str) -> str:
    return " ".join(part.capitalize() for part in name.split("_"))


def input_schema(run: typing.Callable) -> tuple[dict, dict]:
    """The Input object schema and the enum components that its choice inputs reference."""
    from cog import FieldInfo

    hints = typing.get_type_hints(run)
    properties: dict[str, dict] = {}
    components: dict[str, dict] = {}
    required: list[str] = []
    parameters = [p for p in inspect.signature(run).parameters.values() if p.name != "self"]
    for order, parameter in enumerate(parameters):
        info = parameter.default if isinstance(parameter.default, FieldInfo) else FieldInfo(default=parameter.default)
        if info.default is inspect.Parameter.empty:
            info = FieldInfo()
        annotation, optional = _unwrap_optional(hints[parameter.name])
        base = _type_schema(annotation)
        # cog: an Optional list is "optional repeated": not required, but not nullable (a JSON null is refused)
        nullable = optional and base["type"] != "array"
        if info.choices is not None:
            components[parameter.name] = {
                "title": parameter.name,
                "description": "An enumeration.",
                "enum": list(info.choices),
                "type": base["type"],
            }
            prop: dict = {"allOf": [{"$ref": f"#/components/schemas/{parameter.name}"}]}
        else:
            prop = {**base, "title": _title(parameter.name)}
        if info.default is not None:
            prop["default"] = info.default
        elif not optional:
            required.append(parameter.name)
        if nullable:
            prop["nullable"] = True
        for key, value in (
            ("description", info.description),
            ("minimum", info.ge),
            ("maximum", info.le),
            ("minLength", info.min_length),
            ("maxLength", info.max_length),
            ("pattern", info.regex),
        ):
            if value is not None:
                prop[key] = value
        prop["x-order"] = order
        properties[parameter.name] = prop
    schema = {"type": "object", "title": "Input", "properties": properties}
    if required:
        schema["required"] = required
    return schema, components


def output_schema(run: typing.Callable) -> dict:
    return {**_type_schema(typing.get_type_hints(run)["return"]), "title": "Output"}


def openapi_document(predictor: type) -> dict:
    inputs, enums = input_schema(predictor.run)
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    json_body = lambda name: {"content": {"application/json": {"schema": ref(name)}}}  # noqa: E731
    ok = lambda name: {"description": "Successful Response", "content": {"application/json": {"schema": ref(name)}}}  # noqa: E731
    invalid = {"description": "Validation Error", **json_body("HTTPValidationError")}
    prediction_op = {
        "summary": "Predict",
        "operationId": "predict_predictions_post",
        "parameters": [{"in": "header", "name": "prefer", "required": False, "schema": {"type": "string", "title": "Prefer"}}],
        "requestBody": json_body("PredictionRequest"),
        "responses": {"200": ok("PredictionResponse"), "422": invalid},
    }
    id_param = {"in": "path", "name": "prediction_id", "required": True, "schema": {"type": "string", "title": "Prediction ID"}}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": {"description": "Successful Response"}}}},
            "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": {"description": "Successful Response"}}}},
            "/predictions": {"post": prediction_op},
            "/predictions/{prediction_id}": {
                "put": {**prediction_op, "summary": "Predict Idempotent", "operationId": "predict_idempotent_predictions__prediction_id__put", "parameters": [id_param, *prediction_op["parameters"]]}
            },
            "/predictions/{prediction_id}/cancel": {
                "post": {"summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post", "parameters": [id_param], "responses": {"200": {"description": "Successful Response"}, "422": invalid}}
            },
            "/shutdown": {"post": {"summary": "Start Shutdown", "operationId": "start_shutdown_shutdown_post", "responses": {"200": {"description": "Successful Response"}}}},
        },
        "components": {
            "schemas": {
                "Input": inputs,
                "Output": output_schema(predictor.run),
                "Status": {"title": "Status", "description": "An enumeration.", "enum": ["starting", "processing", "succeeded", "canceled", "failed"], "type": "string"},
                "WebhookEvent": {"title": "WebhookEvent", "description": "An enumeration.", "enum": ["start", "output", "logs", "completed"], "type": "string"},
                "PredictionRequest": {
                    "title": "PredictionRequest",
                    "type": "object",
                    "properties": {
                        "input": ref("Input"),
                        "id": {"title": "Id", "type": "string"},
                        "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                        "output_file_prefix": {"title": "Output File Prefix", "type": "string"},
                        "webhook": {"title": "Webhook", "maxLength": 65536, "minLength": 1, "type": "string", "format": "uri"},
                        "webhook_events_filter": {"type": "array", "items": ref("WebhookEvent"), "default": ["start", "output", "logs", "completed"]},
                    },
                },
                "PredictionResponse": {
                    "title": "PredictionResponse",
                    "type": "object",
                    "properties": {
                        "input": ref("Input"),
                        "output": ref("Output"),
                        "id": {"title": "Id", "type": "string"},
                        "version": {"title": "Version", "type": "string"},
                        "created_at": {"title": "Created At", "type": "string", "format": "date-time"},
                        "started_at": {"title": "Started At", "type": "string", "format": "date-time"},
                        "completed_at": {"title": "Completed At", "type": "string", "format": "date-time"},
                        "logs": {"title": "Logs", "type": "string", "default": ""},
                        "error": {"title": "Error", "type": "string"},
                        "status": ref("Status"),
                        "metrics": {"title": "Metrics", "type": "object"},
                    },
                },
                "ValidationError": {
                    "title": "ValidationError",
                    "required": ["loc", "msg", "type"],
                    "type": "object",
                    "properties": {
                        "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                        "msg": {"title": "Message", "type": "string"},
                        "type": {"title": "Error Type", "type": "string"},
                    },
                },
                "HTTPValidationError": {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {"detail": {"title": "Detail", "type": "array", "items": ref("ValidationError")}},
                },
                **enums,
            }
        },
    }


def render(predictor: type) -> str:
    return json.dumps(openapi_document(predictor), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    parser.add_argument("--predictor", help="print the schema of another class, e.g. predict.py:LegacyPredictor")
    args = parser.parse_args()
    if args.predictor:
        print(render(load_predictor(args.predictor)), end="")
        return 0
    module_file = predictor_ref().split(":")[0]
    files = {SCHEMA_FILE: render(load_predictor(predictor_ref()))}
    files.update({own_schema_file(name): render(load_predictor(f"{module_file}:{name}")) for name in OWN_SCHEMAS})
    if args.check:
        stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{_shown(path)} is stale; run script/schema and commit it.", file=sys.stderr)
        if not stale:
            print(", ".join(str(_shown(path)) for path in files) + " are current.")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
