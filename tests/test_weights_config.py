"""Where weights come from: the tiny ones, a configured folder, and missing components fetched from a Hub."""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.servers import HubServer
from weights.locations import resolve_weight_paths
from weights.manifest import MANIFEST

pytest_plugins = ["tests.fixtures.servers"]


def test_tiny_is_the_default_without_gpu(monkeypatch, tiny_weights):
    monkeypatch.delenv("FLUX_WEIGHTS", raising=False)
    monkeypatch.delenv("FLUX_WEIGHTS_DIR", raising=False)
    assert resolve_weight_paths(cuda_available=False) == tiny_weights


def test_configured_folder_is_used_and_missing_parts_come_from_the_hub(monkeypatch, tmp_path, tiny_weights):
    """FLUX_WEIGHTS_DIR with the FLUX folders present and the safety folders missing: those are downloaded
    with huggingface_hub (through HF_ENDPOINT, here a local Hub) into the folder, under the manifest's names."""
    root = tmp_path / "weights"
    root.mkdir()
    (root / MANIFEST["dev"].folder).symlink_to(tiny_weights.dev)
    (root / MANIFEST["schnell"].folder).symlink_to(tiny_weights.schnell)
    hub = HubServer()
    try:
        for name, local in (("safety_stage1", tiny_weights.safety_stage1), ("safety_stage2", tiny_weights.safety_stage2)):
            files = {path.name: path.read_bytes() for path in local.iterdir() if path.is_file() and not path.name.startswith(".")}
            hub.add_repo(MANIFEST[name].repo_id, {**files, "pytorch_model.bin": b"not fetched"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("FLUX_WEIGHTS", raising=False)
        monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(root))
        paths = resolve_weight_paths(cuda_available=False)
    finally:
        hub.close()
    assert not paths.tiny and paths.dev == root / "FLUX.1-dev"
    stage1 = root / MANIFEST["safety_stage1"].folder
    assert paths.safety_stage1 == stage1
    assert (stage1 / "model.safetensors").read_bytes() == (tiny_weights.safety_stage1 / "model.safetensors").read_bytes()
    assert not (stage1 / "pytorch_model.bin").exists()  # only the manifest's patterns are fetched
    assert not list(root.glob(".*.partial"))

    from safety.checker import SafetyChecker

    SafetyChecker.load(paths.safety_stage1, paths.safety_stage2, "cpu")  # what was fetched loads


def test_weights_url_is_used_instead_of_the_hub(monkeypatch, tmp_path, tiny_weights, hub_server, file_server):
    """With FLUX_WEIGHTS_URL set, a missing folder comes from `<base>/<folder>.tar`; the Hub is not asked."""
    from tests.fixtures.servers import make_tar

    root = tmp_path / "weights"
    root.mkdir()
    for name in ("dev", "schnell", "safety_stage1"):
        (root / MANIFEST[name].folder).symlink_to(getattr(tiny_weights, name))
    stage2 = tiny_weights.safety_stage2
    files = {path.name: path.read_bytes() for path in stage2.iterdir() if path.is_file()}
    hub_server.add_repo(MANIFEST["safety_stage2"].repo_id, files)
    file_server.add(f"/w/{MANIFEST['safety_stage2'].folder}.tar", make_tar(files))
    monkeypatch.setenv("FLUX_WEIGHTS", "real")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(root))
    monkeypatch.setenv("FLUX_WEIGHTS_URL", file_server.url + "/w/")  # a trailing slash is fine
    paths = resolve_weight_paths(cuda_available=False)
    assert (paths.safety_stage2 / "model.safetensors").read_bytes() == (stage2 / "model.safetensors").read_bytes()
    assert hub_server.requests == [] and hub_server.storage.requests == []


def test_the_default_real_folder_is_the_projects_model_cache_from_any_working_folder(monkeypatch, tmp_path):
    """script/serve runs coglet in a working folder of its own (for its schema): the default real weights must still
    be the project's model-cache/, where README tells operators to put them, not one in that folder."""
    import weights.locations as locations

    fetched = []
    monkeypatch.setattr(locations, "download_real_weights", lambda root, missing: fetched.append(root))  # no Hub
    monkeypatch.setattr(locations, "verify_weights_folder", lambda folder: None)  # nothing is there to check
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLUX_WEIGHTS", "real")
    for name in ("FLUX_WEIGHTS_DIR", "FLUX_WEIGHTS_URL", "FLUX_SAFETY_WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    paths = resolve_weight_paths(cuda_available=True)
    project_cache = Path(__file__).resolve().parent.parent / "model-cache"
    assert paths.dev == project_cache / MANIFEST["dev"].folder
    assert fetched in ([], [project_cache])
