"""Weights from FLUX_WEIGHTS_URL: each missing folder fetched as `<base>/<folder>.tar` from a loopback host that
speaks Range, extracted with the LoRA tar rules, and published only when complete and checked."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import pytest

from errors import UserError
from lora.download.errors import DownloadRefused, HostFailed
from script.cog_inputs import predict_with_defaults
from tests.fixtures.servers import FileServer, Reply, file_reply, make_tar
from weights.locations import resolve_weight_paths
from weights.manifest import MANIFEST
from weights.verify import DamagedWeights

FOLDERS = [source.folder for source in MANIFEST.values()]
FAST = {"prompt": "a photo of TOK", "num_inference_steps": 2, "megapixels": "0.25", "disable_safety_checker": True}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def tiny_folders(tiny_weights) -> dict[str, Path]:
    return {source.folder: getattr(tiny_weights, name) for name, source in MANIFEST.items()}  # same field names


def serve_tars(server: FileServer, tiny_weights) -> str:
    for folder, path in tiny_folders(tiny_weights).items():
        server.add(f"/weights/{folder}.tar", make_tar(folder_files(path)))
    return server.url + "/weights"


def use_weights_url(monkeypatch, root: Path, base_url: str) -> None:
    """Real weights from `root`, missing folders from `base_url`; private URLs stay refused for everything else."""
    monkeypatch.setenv("FLUX_WEIGHTS", "real")
    monkeypatch.setenv("FLUX_WEIGHTS_DIR", str(root))
    monkeypatch.setenv("FLUX_WEIGHTS_URL", base_url)
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS", raising=False)


def images(predictor) -> list[bytes]:
    return [
        path.read_bytes()  # read at once: the next prediction removes this one's files
        for model in ("dev", "schnell")
        for path in predict_with_defaults(predictor, **FAST, model=model, seed=5, output_format="png")
    ]


@pytest.fixture(scope="module")
def fetched(tiny_weights, tmp_path_factory):
    """An empty weights folder filled from a loopback FLUX_WEIGHTS_URL by one setup, and that setup's images."""
    from predict import Predictor

    root = tmp_path_factory.mktemp("fetched") / "weights"
    server = FileServer()
    with pytest.MonkeyPatch.context() as monkeypatch:  # undone before the tests run (and the session predictor)
        use_weights_url(monkeypatch, root, serve_tars(server, tiny_weights))
        try:
            predictor = Predictor()
            predictor.setup()
        finally:
            server.close()
        made = images(predictor)
    return root, server, made


def test_a_setup_from_the_url_gives_the_images_of_the_folder_itself(fetched, tiny_weights, predictor):
    root, server, fetched_images = fetched
    for folder, source in tiny_folders(tiny_weights).items():
        assert folder_files(root / folder) == folder_files(source)
    assert sorted(path.name for path in root.iterdir()) == sorted([*FOLDERS, ".fetch.lock"])  # no staging, no tars
    ranged = [request for request in server.requests if "range" in request.headers]
    assert {request.path for request in ranged} == {f"/weights/{folder}.tar" for folder in FOLDERS}
    assert fetched_images == images(predictor)  # `predictor`: the session's, on the tiny folders themselves


def test_a_restart_with_the_host_gone_starts_from_the_folder_alone(fetched, monkeypatch):
    from predict import Predictor

    root, server, fetched_images = fetched  # the server is closed: any connection would fail
    requests_before = len(server.requests)
    use_weights_url(monkeypatch, root, server.url + "/weights")
    predictor = Predictor()
    predictor.setup()
    assert images(predictor) == fetched_images
    assert len(server.requests) == requests_before


def test_the_host_is_trusted_for_weights_only(fetched, monkeypatch, tmp_path):
    """The weight host may be loopback, yet a LoRA URL on that same host is still refused as private."""
    from lora.fetch import fetch_lora

    _, server, _ = fetched
    monkeypatch.setenv("FLUX_WEIGHTS_URL", server.url + "/weights")
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(tmp_path / "loras"))
    with pytest.raises(DownloadRefused, match="not a public internet address"):
        fetch_lora(server.url + "/weights/lora.safetensors", input_name="extra_lora")


@pytest.fixture
def one_folder_missing(tiny_weights, tmp_path):
    """A weights folder with every folder but FLUX.1-dev (symlinks to the tiny ones)."""
    root = tmp_path / "weights"
    root.mkdir()
    for folder, path in tiny_folders(tiny_weights).items():
        if folder != "FLUX.1-dev":
            (root / folder).symlink_to(path)
    return root


def nothing_published(root: Path) -> bool:
    left = {path.name for path in root.iterdir()} - {".fetch.lock", ".downloads"}
    partials = list((root / ".downloads" / "partial").iterdir()) if (root / ".downloads").exists() else []
    return "FLUX.1-dev" not in left and not any(name.endswith(".partial") for name in left) and not partials


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "extra, files, message",
    [
        ([link("transformer/evil", "/etc/passwd")], {}, "has a link"),
        ([link("hard", "model_index.json", tarfile.LNKTYPE)], {}, "has a link"),
        ([], {"../escaped.txt": b"outside"}, "unsafe entry name '../escaped.txt'"),
        ([], {"/absolute.txt": b"outside"}, "unsafe entry name '/absolute.txt'"),
    ],
    ids=["symlink", "hardlink", "dot-dot", "absolute"],
)
def test_a_tar_with_a_link_or_unsafe_name_is_refused_and_leaves_nothing(
    one_folder_missing, tiny_weights, monkeypatch, extra, files, message
):
    root = one_folder_missing
    with FileServer() as server:
        server.add("/w/FLUX.1-dev.tar", make_tar({**folder_files(tiny_weights.dev), **files}, extra))
        use_weights_url(monkeypatch, root, server.url + "/w")
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_weight_paths(cuda_available=False)
    assert nothing_published(root)
    assert not (root.parent / "escaped.txt").exists() and not Path("/absolute.txt").exists()


def test_damaged_contents_are_checked_in_staging_and_never_published(one_folder_missing, tiny_weights, monkeypatch):
    root = one_folder_missing
    files = folder_files(tiny_weights.dev)
    name = "transformer/diffusion_pytorch_model.safetensors"
    files[name] = files[name][:-100]  # a good tar of a cut-short file
    with FileServer() as server:
        server.add("/w/FLUX.1-dev.tar", make_tar(files))
        use_weights_url(monkeypatch, root, server.url + "/w")
        with pytest.raises(DamagedWeights, match=re.escape(f"FLUX.1-dev/{name}")):
            resolve_weight_paths(cuda_available=False)
    assert nothing_published(root)


def test_a_truncated_tar_is_refused(one_folder_missing, tiny_weights, monkeypatch):
    root = one_folder_missing
    with FileServer() as server:
        server.add("/w/FLUX.1-dev.tar", make_tar(folder_files(tiny_weights.dev))[:-30_000])
        use_weights_url(monkeypatch, root, server.url + "/w")
        with pytest.raises(UserError, match="damaged or truncated"):
            resolve_weight_paths(cuda_available=False)
    assert nothing_published(root)


def test_a_tar_of_the_folder_itself_works_too(one_folder_missing, tiny_weights, monkeypatch):
    root = one_folder_missing
    files = {f"FLUX.1-dev/{name}": data for name, data in folder_files(tiny_weights.dev).items()}
    with FileServer() as server:
        server.add("/w/FLUX.1-dev.tar", make_tar(files))
        use_weights_url(monkeypatch, root, server.url + "/w")
        paths = resolve_weight_paths(cuda_available=False)
    assert folder_files(paths.dev) == folder_files(tiny_weights.dev)
    assert not (root / ".FLUX.1-dev.partial").exists()


def test_an_interrupted_download_continues_where_it_stopped(one_folder_missing, monkeypatch):
    """One connection, 1 MiB chunks: the host fails after three chunks; the next setup fetches only the rest."""
    import numpy as np
    from safetensors.numpy import save

    root = one_folder_missing
    weights = save({"weight": np.arange(2 << 20, dtype=np.float32)})  # 8 MiB, so the tar has 9 chunks
    tar = make_tar({"model_index.json": b"{}", "transformer/model.safetensors": weights})
    answered = {"count": 0, "fail_after": 3}

    def flaky(_request) -> Reply:
        answered["count"] += 1
        failing = answered["fail_after"] is not None and answered["count"] > answered["fail_after"]
        return Reply(503) if failing else file_reply(tar, ranges=True)

    with FileServer() as server:
        server.route(r"/w/FLUX\.1-dev\.tar", flaky)
        use_weights_url(monkeypatch, root, server.url + "/w")
        monkeypatch.setenv("FLUX_DOWNLOAD_CONNECTIONS", "1")
        monkeypatch.setenv("FLUX_DOWNLOAD_CHUNK_MB", "1")
        monkeypatch.setenv("FLUX_DOWNLOAD_RETRIES", "0")
        with pytest.raises(HostFailed, match="HTTP 503"):
            resolve_weight_paths(cuda_available=False)
        assert not (root / "FLUX.1-dev").exists()
        first_attempt = len(server.requests)
        answered["fail_after"] = None
        paths = resolve_weight_paths(cuda_available=False)
        asked = [request.headers["range"] for request in server.requests[first_attempt:]]
    assert (paths.dev / "transformer" / "model.safetensors").read_bytes() == weights
    mib = 1 << 20
    # the probe (its answer is dropped: those bytes are here), then only the chunks after the three it had
    assert asked[0] == f"bytes=0-{mib - 1}" and asked[1].startswith(f"bytes={3 * mib}-")
    assert len(asked) == 1 + len(range(3 * mib, len(tar), mib))
    assert not (root / ".downloads").exists()  # nothing left to resume once every folder is here


def test_a_deleted_folder_is_fetched_again(one_folder_missing, tiny_weights, monkeypatch):
    root = one_folder_missing
    with FileServer() as server:
        server.add("/w/FLUX.1-dev.tar", make_tar(folder_files(tiny_weights.dev)))
        use_weights_url(monkeypatch, root, server.url + "/w")
        resolve_weight_paths(cuda_available=False)
        shutil.rmtree(root / "FLUX.1-dev")  # what a damaged folder's error tells the operator to do
        paths = resolve_weight_paths(cuda_available=False)
        fetches = [r for r in server.requests if r.headers.get("range", "").startswith("bytes=0-")]
    assert folder_files(paths.dev) == folder_files(tiny_weights.dev)
    assert len(fetches) == 2
