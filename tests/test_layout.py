"""The house rules README's "Layout" section states, checked on the source: the import arrow, settings read in
one place, every setting documented, no module over 400 lines and no function over 80."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import settings

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flux", "lora", "safety", "weights")
# Layers, top to bottom. A module may import its own layer's package or any lower layer, never a higher or a
# sibling one (lora and safety do not know each other). Downloading is the bottom layer's service: weights may
# fetch with lora.download (weights from FLUX_WEIGHTS_URL), lora.download never imports weights.
LAYERS = {
    "predict": 4, "flux": 3, "lora": 2, "safety": 2, "weights": 1.5, "lora.download": 1,
    "errors": 0, "settings": 0, "units": 0, "version": 0,
}  # fmt: skip


def project_modules() -> list[Path]:
    files = [ROOT / "predict.py", ROOT / "errors.py", ROOT / "settings.py", ROOT / "units.py", ROOT / "version.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def layer_of(dotted: str) -> str | None:
    matches = [name for name in LAYERS if dotted == name or dotted.startswith(name + ".")]
    return max(matches, key=len) if matches else None


def imported_names(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def dotted_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    own = layer_of(dotted_name(path))
    for name in imported_names(path):
        if name.split(".")[0] == "cog":
            assert own == "predict", f"{path.name} imports cog; only predict.py may"
        target = layer_of(name)
        if target is None or target == own:
            continue
        assert LAYERS[target] < LAYERS[own], f"{dotted_name(path)} ({own}) imports {name} ({target}): upward or sideways"


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_over_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines; split it by concern"


MAX_FUNCTION_LINES = 80
# Functions allowed over MAX_FUNCTION_LINES for now, as "path:function" (empty: there are none). Add one only with
# the issue that will shorten it, and remove it when that is done.
LONG_FUNCTIONS_FOR_NOW: set[str] = set()


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_80_lines(path: Path) -> None:
    where = str(path.relative_to(ROOT))
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and f"{where}:{node.name}" not in LONG_FUNCTIONS_FOR_NOW
    ]
    assert long == [], f"{where}: {', '.join(long)}; split into named steps"


def test_settings_are_read_only_through_settings_py() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in project_modules()
        if path.name != "settings.py" and re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text())
    ]
    assert offenders == []


def settings_read() -> set[str]:
    used = set()
    for path in project_modules():
        used |= set(re.findall(r"settings\.(?:text|number|flag|paths|is_set)\(\s*\"(\w+)\"", path.read_text()))
    return used


def test_every_setting_used_is_declared() -> None:
    used = settings_read()
    assert used, "the pattern found no settings reads at all"
    assert sorted(used - set(settings.SETTINGS)) == []


def test_every_declared_setting_is_read() -> None:
    """A declared setting nothing reads would look built: an operator would set it and nothing would change.
    A name passed on as a string literal (a host's base URL setting) counts as read."""
    read_by_libraries = {"HF_TOKEN": "huggingface_hub reads it itself, for the Hub host only"}
    source = "\n".join(path.read_text() for path in project_modules() if path.name != "settings.py")
    unread = [
        name for name in settings.SETTINGS
        if name not in settings_read() | set(read_by_libraries) and not re.search(rf"[\"']{name}[\"']", source)
    ]
    assert unread == []


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    missing = [name for name in settings.SETTINGS if f"`{name}`" not in table]
    assert missing == []


def test_the_test_session_sets_its_environment_at_configure_and_leaves_nothing_behind(tmp_path: Path) -> None:
    assert os.environ["FLUX_WEIGHTS"] == "tiny" and Path(os.environ["FLUX_LORA_CACHE_DIR"]).is_dir()
    importing = "import os; before = dict(os.environ); import tests.conftest; assert dict(os.environ) == before"
    subprocess.run([sys.executable, "-c", importing], cwd=ROOT, check=True)
    session_tmp = tmp_path / "tmp"
    session_tmp.mkdir()
    one_test = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_every_setting_is_in_the_readme_table"]
    environment = {key: value for key, value in os.environ.items() if key not in ("FLUX_LORA_CACHE_DIR", "FLUX_WEIGHTS")}
    subprocess.run(one_test, cwd=ROOT, env={**environment, "TMPDIR": str(session_tmp)}, check=True, capture_output=True)
    assert list(session_tmp.iterdir()) == []  # its throw-away LoRA cache was removed
