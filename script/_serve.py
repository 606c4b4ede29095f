"""`script/serve [--host H]`: the real cog HTTP server (coglet) for one predictor class, with that class's schema.

The class is COG_PREDICT_TYPE_STUB's (the variable coglet reads, as a built image sets it), else the one cog.yaml
deploys. coglet validates and fills in inputs from `.cog/openapi_schema.json` in its working folder, whatever class
it runs: started in the project folder for another class than the committed schema describes, it would pass that
class inputs it does not take, and every request would fail. So each run gets a working folder of its own that holds
the schema of the class it serves (generated as script/schema does), with the project on PYTHONPATH and the class
named by its absolute path; the folder is removed when the server exits. The committed schema is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def absolute_ref(ref: str) -> str:
    """`predict.py:LegacyPredictor` as coglet must see it from another working folder."""
    module_file, _, class_name = ref.partition(":")
    return f"{(ROOT / module_file).resolve()}:{class_name}"


def schema_for(ref: str) -> str:
    """The OpenAPI document of the class `ref` names; SystemExit with one sentence when there is no such class."""
    from script._schema import render
    from script.cog_inputs import load_predictor

    module_file, _, class_name = ref.partition(":")
    if not class_name or not (ROOT / module_file).is_file():
        raise SystemExit(f"COG_PREDICT_TYPE_STUB={ref}: name a class as FILE:CLASS, e.g. predict.py:LegacyPredictor.")
    try:
        return render(load_predictor(ref))
    except AttributeError:
        raise SystemExit(f"COG_PREDICT_TYPE_STUB={ref}: {module_file} has no class {class_name}.") from None


# Settings that hold folders (`:`-separated lists too). coglet runs in a folder of its own, so a relative one is made
# absolute against this process's working folder first (script/serve's is the project), to mean what it meant there.
PATH_SETTINGS = ("FLUX_WEIGHTS_DIR", "FLUX_SAFETY_WEIGHTS_DIR", "FLUX_TINY_WEIGHTS_DIR", "FLUX_COMPILE_CACHE_DIR",
                 "FLUX_LORA_CACHE_DIR", "FLUX_LORA_LOCAL_DIRS", "FLUX_INPUT_LOCAL_DIRS")


def absolute_folders(value: str) -> str:
    parts = value.split(os.pathsep)
    return os.pathsep.join(part if not part or part.startswith("~") else os.path.abspath(part) for part in parts)


def server_environment(ref: str) -> dict[str, str]:
    python_path = os.pathsep.join(part for part in (str(ROOT), os.environ.get("PYTHONPATH", "")) if part)
    folders = {name: absolute_folders(os.environ[name]) for name in PATH_SETTINGS if name in os.environ}
    return {
        **os.environ,
        **folders,
        "COG_PREDICT_TYPE_STUB": absolute_ref(ref),
        "PYTHONPATH": python_path,
        # coglet's worker re-imports itself, so this interpreter's bin comes first on PATH
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def serve(ref: str, coglet_args: list[str]) -> int:
    schema = schema_for(ref)
    folder = Path(tempfile.mkdtemp(prefix="flux-serve-"))
    try:
        (folder / ".cog").mkdir()
        (folder / ".cog" / "openapi_schema.json").write_text(schema)
        print(f"Serving {ref} with its own schema ({folder / '.cog' / 'openapi_schema.json'})", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "cog.server.http", *coglet_args]
        process = subprocess.Popen(command, cwd=folder, env=server_environment(ref))
        for signum in (signal.SIGINT, signal.SIGTERM):  # the server shuts down; this process waits for it
            signal.signal(signum, lambda number, _frame: process.send_signal(number))
        return process.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    from script.cog_inputs import predictor_ref

    return serve(os.environ.get("COG_PREDICT_TYPE_STUB") or predictor_ref(), sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
