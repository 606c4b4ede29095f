"""Calling a predictor the way cog does, for script/predict and the tests (predict.py stays the schema only).

- `predictor_ref()`: the class cog.yaml deploys (`run:`), e.g. "predict.py:Predictor".
- `cog_environment()`: the variables cog.yaml sets in the image (`environment:`), e.g. the CUDA allocator's.
- `load_predictor(ref)`: that class, imported from its file.
- `predict_with_defaults(predictor, **inputs)`: run() with omitted inputs at their declared defaults.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def predictor_ref() -> str:
    """The predictor cog.yaml deploys (`run:`, or the deprecated `predict:`), the one the schema file describes."""
    import yaml

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    return config.get("run") or config["predict"]


def cog_environment() -> dict[str, str]:
    """cog.yaml's `environment:` entries ("NAME=value" each) as {NAME: value}: what the deployed image runs with."""
    import yaml

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    return dict(entry.split("=", 1) for entry in config.get("environment") or [])


def load_predictor(ref: str) -> type:
    module_file, class_name = ref.split(":")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module_name = Path(module_file).stem
    module = sys.modules.get(module_name)
    if module is None or Path(getattr(module, "__file__", "")).resolve() != (ROOT / module_file).resolve():
        spec = importlib.util.spec_from_file_location(module_name, ROOT / module_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return getattr(module, class_name)


def predict_with_defaults(predictor: object, **inputs: object) -> list:
    """Call run() as cog would: omitted inputs take their declared defaults (not FieldInfo objects)."""
    parameters = inspect.signature(predictor.run).parameters
    unknown = sorted(set(inputs) - set(parameters))
    if unknown:
        raise ValueError(f"unknown input(s) {', '.join(unknown)}; valid inputs: {', '.join(parameters)}")
    resolved = {name: inputs[name] if name in inputs else parameter.default.default for name, parameter in parameters.items()}
    return predictor.run(**resolved)
