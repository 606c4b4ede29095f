"""fetch_lora end to end: every source kind against local servers that speak Hugging Face's, CivitAI's and
Replicate's protocols, plus plain URLs, data: URIs and local paths."""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download

from errors import UserError
from lora.download.errors import DownloadCancelled, HostFailed
from lora.download.redaction import install_redaction
from lora.fetch import fetch_lora, pick_hf_file
from tests.fixtures.servers import (
    PICKLE_BYTES,
    CivitaiServer,
    CivitaiVersion,
    FileServer,
    HubServer,
    LocalServer,
    ReplicateServer,
    Reply,
    json_reply,
    make_safetensors,
    make_tar,
)

pytest_plugins = ["tests.fixtures.servers"]

V1 = "1" * 64
V2 = "2" * 64
LORA_A = make_safetensors(seed=1)
LORA_B = make_safetensors(seed=2)


@pytest.fixture(autouse=True)
def lora_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "lora-cache"
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(cache))
    monkeypatch.setenv("FLUX_CACHE_MIN_FREE_GB", "0")
    monkeypatch.setenv("FLUX_DOWNLOAD_RETRIES", "0")
    monkeypatch.setenv("FLUX_ALLOW_PRIVATE_URLS", "1")
    for name in ("FLUX_LORA_LOCAL_DIRS", "FLUX_LORA_MAX_GB", "HF_TOKEN", "CIVITAI_API_TOKEN", "REPLICATE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return cache


def fetch(source: str, input_name: str = "extra_lora") -> Path:
    return fetch_lora(source, input_name=input_name)


def fetch_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "lora.fetch"]


def cache_entries(cache: Path) -> list[Path]:
    folder = cache / "entries"
    return sorted(folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- Hugging Face


def test_hub_fixture_speaks_the_protocol_huggingface_hub_expects(hub_server: HubServer, tmp_path: Path) -> None:
    commit = hub_server.add_repo("alice/style", {"lora.safetensors": LORA_A, "README.md": b"# style"})
    path = hf_hub_download("alice/style", "lora.safetensors", endpoint=hub_server.url, cache_dir=tmp_path / "hf")
    assert Path(path).read_bytes() == LORA_A
    api = HfApi(endpoint=hub_server.url)
    assert sorted(api.list_repo_files("alice/style")) == ["README.md", "lora.safetensors"]
    assert api.model_info("alice/style").sha == commit


def test_hf_repo_with_one_safetensors(hub_server: HubServer, lora_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    hub_server.add_repo("alice/style", {"style.safetensors": LORA_A, "README.md": b"# style", "samples/a.png": b"png"})
    with caplog.at_level(logging.INFO, logger="lora.fetch"):
        path = fetch("huggingface.co/alice/style")
        assert path.read_bytes() == LORA_A and path.suffix == ".safetensors"
        assert fetch("https://www.huggingface.co/alice/style/") == path
    first, second = fetch_lines(caplog)
    assert first.startswith("extra_lora: LoRA huggingface.co/alice/style, 2.3 kB, ") and first.endswith(
        " s, downloaded"
    )
    assert second.endswith("cache hit")
    assert len(hub_server.requests_for("/api/models/alice/style/tree/main")) == 1  # the hit asked nothing


@pytest.mark.parametrize(
    ("files", "picked"),
    [
        ({"a.safetensors": LORA_B, "lora.safetensors": LORA_A}, LORA_A),
        ({"pytorch_lora_weights.safetensors": LORA_A, "checkpoint-500/x.safetensors": LORA_B}, LORA_A),
        ({"sub/only.safetensors": LORA_A, "model.ckpt": PICKLE_BYTES}, LORA_A),
    ],
)
def test_hf_pick_rule(hub_server: HubServer, files: dict[str, bytes], picked: bytes) -> None:
    hub_server.add_repo("alice/style", files)
    assert fetch("hf.co/alice/style").read_bytes() == picked


def test_hf_repo_with_several_files_and_no_rule_match_lists_them(hub_server: HubServer) -> None:
    hub_server.add_repo("alice/style", {"v1.safetensors": LORA_A, "v2.safetensors": LORA_B})
    with pytest.raises(UserError) as caught:
        fetch("huggingface.co/alice/style")
    message = str(caught.value)
    assert message.startswith(
        "extra_lora: huggingface.co/alice/style holds 2 .safetensors files (v1.safetensors, v2.safetensors)"
    )
    assert "huggingface.co/alice/style/v1.safetensors" in message


def test_pick_rule_unit() -> None:
    assert pick_hf_file(["README.md", "x.safetensors"], repo_id="a/b", input_name="e") == "x.safetensors"
    assert (
        pick_hf_file(["lora.safetensors", "pytorch_lora_weights.safetensors"], repo_id="a/b", input_name="e")
        == "lora.safetensors"
    )
    assert (
        pick_hf_file(["pytorch_lora_weights.safetensors", "z.safetensors"], repo_id="a/b", input_name="e")
        == "pytorch_lora_weights.safetensors"
    )
    with pytest.raises(UserError, match="none is named lora.safetensors or pytorch_lora_weights.safetensors"):
        pick_hf_file(["sub/lora.safetensors", "y.safetensors"], repo_id="a/b", input_name="e")
    with pytest.raises(UserError, match=r"holds no .safetensors file \(it has model.bin: pickle"):
        pick_hf_file(["model.bin"], repo_id="a/b", input_name="e")
    many = [f"f{i:02}.safetensors" for i in range(25)]
    with pytest.raises(UserError, match="and 5 more"):
        pick_hf_file(many, repo_id="a/b", input_name="e")


def test_hf_named_files_and_revisions(hub_server: HubServer) -> None:
    commit = hub_server.add_repo("alice/style", {"v1.safetensors": LORA_A, "deep/dir/my v2.safetensors": LORA_B})
    assert fetch("huggingface.co/alice/style/v1.safetensors").read_bytes() == LORA_A
    assert fetch("https://huggingface.co/alice/style/blob/main/deep/dir/my%20v2.safetensors").read_bytes() == LORA_B
    assert (
        fetch(f"https://huggingface.co/alice/style/resolve/{commit}/v1.safetensors?download=true").read_bytes()
        == LORA_A
    )
    assert hub_server.requests_for("/api/") == []  # a named file needs no listing


def test_hf_private_repo_uses_the_token_on_the_hub_only(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hub_server.add_repo("alice/secret", {"lora.safetensors": LORA_A}, private=True)
    with pytest.raises(UserError, match=r"^extra_lora: huggingface.co/alice/secret was not found.*HF_TOKEN"):
        fetch("huggingface.co/alice/secret")
    monkeypatch.setenv("HF_TOKEN", HubServer.token)
    install_redaction()  # as setup does
    with caplog.at_level(logging.DEBUG):
        assert fetch("huggingface.co/alice/secret").read_bytes() == LORA_A
    resolve = hub_server.requests_for("/alice/secret/resolve/")
    assert resolve and all(r.headers.get("authorization") == f"Bearer {HubServer.token}" for r in resolve)
    assert hub_server.storage.requests and all("authorization" not in r.headers for r in hub_server.storage.requests)
    assert HubServer.token not in caplog.text and "X-Amz-Signature" not in caplog.text


def test_hf_errors_say_what_to_do(hub_server: HubServer) -> None:
    hub_server.add_repo("alice/gated", {"lora.safetensors": LORA_A}, gated=True)
    hub_server.add_repo("alice/style", {"lora.safetensors": LORA_A})
    hub_server.add_repo("alice/pickles", {"model.ckpt": PICKLE_BYTES})
    with pytest.raises(UserError, match="gated or your token cannot read it; accept its conditions"):
        fetch("huggingface.co/alice/gated")  # the Hub API's GatedRepoError: the same hint as a 403 download
    with pytest.raises(UserError, match="gated or your token cannot read it"):
        fetch("huggingface.co/alice/gated/lora.safetensors")
    with pytest.raises(UserError, match=r"has no file 'nope.safetensors' at revision 'main'"):
        fetch("huggingface.co/alice/style/nope.safetensors")
    with pytest.raises(UserError, match="has no revision 'v9'"):
        fetch("huggingface.co/alice/style/tree/v9")
    with pytest.raises(UserError, match="holds no .safetensors file"):
        fetch("huggingface.co/alice/pickles")
    with pytest.raises(UserError, match="huggingface.co/bob/none was not found"):
        fetch("huggingface.co/bob/none")


# ---------------------------------------------------------------- CivitAI


def test_civitai_forms(civitai_server: CivitaiServer) -> None:
    civitai_server.add_model(10, [CivitaiVersion(202, LORA_B), CivitaiVersion(201, LORA_A)])
    assert fetch("civitai.com/models/10/flux-style").read_bytes() == LORA_B  # the newest version
    assert fetch("https://civitai.com/models/10?modelVersionId=201").read_bytes() == LORA_A
    assert fetch("https://civitai.com/api/download/models/202?type=Model&format=SafeTensor").read_bytes() == LORA_B
    downloads = civitai_server.requests_for("/api/download/models/")
    assert downloads and all(r.path.endswith("?type=Model&format=SafeTensor") for r in downloads)


@pytest.mark.parametrize("storage_ranges", [True, False])
def test_civitai_token_goes_to_civitai_only(
    monkeypatch: pytest.MonkeyPatch, allow_private_urls: None, caplog: pytest.LogCaptureFixture, storage_ranges: bool
) -> None:
    server = CivitaiServer(storage_ranges=storage_ranges)  # CivitAI's storage does not always honour Range
    try:
        monkeypatch.setenv("FLUX_CIVITAI_BASE_URL", server.url)
        server.add_model(10, [CivitaiVersion(201, LORA_A, requires_login=True)])
        with pytest.raises(UserError, match=r"^extra_lora: CivitAI requires a login .* set CIVITAI_API_TOKEN"):
            fetch("civitai.com/api/download/models/201")
        monkeypatch.setenv("CIVITAI_API_TOKEN", CivitaiServer.token)
        before = len(server.requests)
        with caplog.at_level(logging.DEBUG):
            assert fetch("civitai.com/models/10").read_bytes() == LORA_A
        api = server.requests[before:]
        assert api and all(r.headers.get("authorization") == f"Bearer {CivitaiServer.token}" for r in api)
        assert all("token" not in r.path for r in api)  # the token is in no URL
        assert server.storage.requests and all("authorization" not in r.headers for r in server.storage.requests)
        assert CivitaiServer.token not in caplog.text and "X-Amz-Signature" not in caplog.text
    finally:
        server.close()


def test_civitai_errors_say_what_to_do(civitai_server: CivitaiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    civitai_server.add_model(10, [CivitaiVersion(201, LORA_A, early_access=True)])
    civitai_server.add_model(11, [CivitaiVersion(301, PICKLE_BYTES, "model.ckpt", format="PickleTensor")])
    monkeypatch.setenv("CIVITAI_API_TOKEN", "a-wrong-token")
    with pytest.raises(UserError, match="early access") as caught:
        fetch("civitai.com/models/10")
    assert "a-wrong-token" not in str(caught.value)
    with pytest.raises(
        UserError, match=r"CivitAI returned 404 for version 10\. A version id differs from the model id"
    ):
        fetch("civitai.com/api/download/models/10")
    with pytest.raises(UserError, match=r"CivitAI has no model 99\. If 99 is a version id"):
        fetch("civitai.com/models/99")
    with pytest.raises(UserError, match="has no SafeTensor file; pickle formats are refused"):
        fetch("civitai.com/models/11")


def test_pickle_behind_a_safetensors_request_is_refused(civitai_server: CivitaiServer, lora_env: Path) -> None:
    civitai_server.add_model(11, [CivitaiVersion(301, PICKLE_BYTES, "model.safetensors")])
    with pytest.raises(UserError, match=r"is a PyTorch pickle checkpoint.*only \.safetensors"):
        fetch("civitai.com/api/download/models/301")
    assert cache_entries(lora_env) == []


@pytest.mark.parametrize(
    "answer",
    [
        {"modelVersions": {"id": 1}},
        {"modelVersions": 5},
        {"modelVersions": [{"id": 1, "files": 5}]},
        {"modelVersions": [{"id": 1, "files": [{"type": "Model", "metadata": "SafeTensor"}]}]},
        {"modelVersions": [{"id": 1, "files": [{"metadata": {"format": "SafeTensor"}, "hashes": ["x"]}]}]},
    ],
)
def test_malformed_civitai_json_is_civitais_fault(
    answer: object, monkeypatch: pytest.MonkeyPatch, allow_private_urls: None
) -> None:
    with LocalServer() as server:
        server.route(r"/api/v1/models/\d+", lambda _request: json_reply(answer))
        monkeypatch.setenv("FLUX_CIVITAI_BASE_URL", server.url)
        with pytest.raises(HostFailed, match=r"^extra_lora: CivitAI answered unexpected JSON for model 7$"):
            fetch("civitai.com/models/7")


# ---------------------------------------------------------------- Replicate


def test_replicate_versions(replicate_server: ReplicateServer) -> None:
    replicate_server.add_weights(
        "bob", "flux-me", V1, make_tar({"output/flux_train_replicate/lora.safetensors": LORA_A})
    )
    replicate_server.add_weights("bob", "flux-me", V2, make_tar({"lora.safetensors": LORA_B, "config.yaml": b"a: 1"}))
    path = fetch("bob/flux-me", input_name="replicate_weights")
    assert path.read_bytes() == LORA_B  # no version: the newest
    assert fetch(f"bob/flux-me/{V1}").read_bytes() == LORA_A
    assert fetch(f"bob/flux-me:{V1}") == fetch(f"https://replicate.com/bob/flux-me/versions/{V1}")
    assert [r.path for r in replicate_server.requests] == [
        "/bob/flux-me/_weights",
        f"/bob/flux-me/versions/{V1}/_weights",
    ]  # the other spellings were cache hits


def test_replicate_private_model_token_stays_on_replicate(
    replicate_server: ReplicateServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    replicate_server.add_weights("bob", "private", V1, make_tar({"lora.safetensors": LORA_A}), private=True)
    with pytest.raises(
        UserError, match=r"^replicate_weights: Replicate has no model bob/private, or it has no trained weights"
    ):
        fetch("bob/private", input_name="replicate_weights")
    monkeypatch.setenv("REPLICATE_API_TOKEN", ReplicateServer.token)
    assert fetch("bob/private").read_bytes() == LORA_A
    assert replicate_server.requests[-1].headers["authorization"] == f"Bearer {ReplicateServer.token}"
    assert replicate_server.delivery.requests and all(
        "authorization" not in r.headers for r in replicate_server.delivery.requests
    )


@pytest.mark.parametrize("status", [401, 403])
def test_a_replicate_refusal_says_which_token_to_set(
    file_server: FileServer, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    file_server.route("/bob/locked/_weights", lambda _request: Reply(status, {}, b"denied"))
    monkeypatch.setenv("FLUX_REPLICATE_BASE_URL", file_server.url)
    expected = rf"^replicate_weights: Replicate refused access to bob/locked \(HTTP {status}\); .* REPLICATE_API_TOKEN"
    with pytest.raises(UserError, match=expected):
        fetch("bob/locked", input_name="replicate_weights")


def test_replicate_tar_must_hold_exactly_one_safetensors(replicate_server: ReplicateServer, lora_env: Path) -> None:
    replicate_server.add_weights("bob", "two", V1, make_tar({"a.safetensors": LORA_A, "b.safetensors": LORA_B}))
    replicate_server.add_weights("bob", "evil", V1, make_tar({"../../lora.safetensors": LORA_A}))
    with pytest.raises(UserError, match="holds 2 .safetensors files"):
        fetch("bob/two")
    with pytest.raises(UserError, match="unsafe entry name"):
        fetch("bob/evil")
    assert cache_entries(lora_env) == []


# ---------------------------------------------------------------- plain URLs, data: URIs, local paths


def test_plain_urls(file_server: FileServer, caplog: pytest.LogCaptureFixture, lora_env: Path) -> None:
    signed = file_server.add("/style.safetensors", LORA_A) + "?X-Amz-Signature=urlsecret&X-Amz-Expires=60"
    tar = file_server.add("/xezq/abc/trained_model.tar", make_tar({"lora.safetensors": LORA_B}))
    bare = file_server.add("/download", LORA_A)
    with caplog.at_level(logging.DEBUG):
        assert fetch(signed).read_bytes() == LORA_A
    assert "urlsecret" not in caplog.text and "/style.safetensors?..." in caplog.text
    assert fetch(tar).read_bytes() == LORA_B
    assert fetch(bare + "?id=5").read_bytes() == LORA_A  # no extension: the content decides


def test_urls_to_pickles_are_refused(file_server: FileServer, lora_env: Path) -> None:
    with pytest.raises(UserError, match="pickles"):
        fetch(file_server.add("/model.ckpt", PICKLE_BYTES))
    assert file_server.requests == []  # refused before downloading
    with pytest.raises(UserError, match="PyTorch pickle checkpoint"):
        fetch(file_server.add("/disguised.safetensors", PICKLE_BYTES))
    with pytest.raises(UserError, match=r"is not a .safetensors file \(nor a .tar"):
        fetch(file_server.add("/page.safetensors", b"<html>Not found</html>" * 10))
    assert cache_entries(lora_env) == []


def test_private_urls_are_refused_unless_configured(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = file_server.add("/style.safetensors", LORA_A)
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS")
    with pytest.raises(UserError, match="extra_lora: refusing to download from 127.0.0.1"):
        fetch(url)
    assert file_server.requests == []


def test_lora_size_limit(file_server: FileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_LORA_MAX_GB", "0.000001")  # 1 kB
    with pytest.raises(UserError, match="larger than the 0.0 MB limit"):
        fetch(file_server.add("/style.safetensors", LORA_A))


def test_data_uris(lora_env: Path) -> None:
    uri = "data:application/octet-stream;base64," + base64.b64encode(LORA_A).decode()
    path = fetch(uri)
    assert path.read_bytes() == LORA_A and path.is_relative_to(lora_env)
    assert fetch(uri) == path
    with pytest.raises(UserError, match="PyTorch pickle"):
        fetch("data:;base64," + base64.b64encode(PICKLE_BYTES).decode())


def test_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "style.safetensors").write_bytes(LORA_A)
    (loras / "trained_model.tar").write_bytes(make_tar({"output/lora.safetensors": LORA_B}))
    (loras / "fake.safetensors").write_bytes(PICKLE_BYTES)
    monkeypatch.delenv("FLUX_LORA_LOCAL_DIRS", raising=False)
    with pytest.raises(UserError, match="extra_lora: local file paths are not accepted by this server"):
        fetch(str(loras / "style.safetensors"))
    with pytest.raises(UserError, match="not accepted") as refused:
        fetch("/etc/passwd")  # no file content and no hint of whether it exists
    assert "root" not in str(refused.value) and "no such file" not in str(refused.value)
    assert fetch_lora(str(loras / "style.safetensors"), input_name="replicate_weights", allow_any_local_path=True).exists()
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="lora.fetch"):
        assert fetch(str(loras / "style.safetensors")) == loras / "style.safetensors"  # used in place
    assert fetch_lines(caplog)[-1].endswith("local file")
    extracted = fetch(f"file://{loras}/trained_model.tar")
    assert extracted.read_bytes() == LORA_B and extracted.is_relative_to(lora_env)
    monkeypatch.chdir(tmp_path)
    assert fetch("./loras/style.safetensors") == loras / "style.safetensors"
    with pytest.raises(UserError, match="PyTorch pickle"):
        fetch("loras/fake.safetensors")
    with pytest.raises(UserError, match="no such file: ./loras/none.safetensors"):
        fetch("./loras/none.safetensors")
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="must be inside FLUX_LORA_LOCAL_DIRS"):
        fetch("./loras/style.safetensors")


def test_operator_configured_endpoints_may_be_private_but_user_urls_may_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT on loopback (a self-hosted mirror) works without FLUX_ALLOW_PRIVATE_URLS; a user's URL does not."""
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS", raising=False)
    hub, files = HubServer(), FileServer()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo("alice/style", {"lora.safetensors": LORA_A})
        assert fetch("huggingface.co/alice/style").read_bytes() == LORA_A
        url = files.add("/style.safetensors", LORA_A)
        with pytest.raises(UserError, match="extra_lora: .*(private|loopback|local)"):
            fetch(url)
    finally:
        hub.close()
        files.close()


# ---------------------------------------------------------------- damaged cache entries, cancel


def damage_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    stat = path.stat()
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the cache's size and mtime checks see nothing


@pytest.mark.parametrize(
    ("offset", "data"),
    [(8, b"[" * 8), (20, b"\xff\xfe\x00\x01")],  # header no longer JSON / no longer UTF-8 or its names broken
    ids=["header_json", "header_bytes"],
)
def test_a_damaged_cache_entry_with_size_and_mtime_intact_is_fetched_again(
    file_server: FileServer, lora_env: Path, caplog: pytest.LogCaptureFixture, offset: int, data: bytes
) -> None:
    url = file_server.add("/style.safetensors", LORA_A)
    cached = fetch(url)
    damage_keeping_size_and_mtime(cached, offset, data)
    requests_before = len(file_server.requests_for("/style.safetensors"))
    with caplog.at_level(logging.WARNING, logger="lora.fetch"):
        again = fetch(url)
    assert again.read_bytes() == LORA_A
    assert len(file_server.requests_for("/style.safetensors")) > requests_before
    assert f"the cached copy of {url} is damaged; fetching it again" in caplog.text
    assert fetch(url) == again  # repaired: a plain hit from now on


def test_a_host_serving_a_damaged_file_gets_an_error_naming_the_source_not_the_cache(
    file_server: FileServer, lora_env: Path
) -> None:
    broken = bytearray(LORA_A)
    broken[20:24] = b"\xff\xfe\x00\x01"
    url = file_server.add("/broken.safetensors", bytes(broken))
    with pytest.raises(UserError, match=r"^extra_lora: ") as caught:
        fetch(url)
    assert str(lora_env) not in str(caught.value) and "data.safetensors" not in str(caught.value)
    assert cache_entries(lora_env) == []


def test_header_damage_that_safetensors_would_refuse_is_refused_at_fetch(file_server: FileServer, tmp_path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    header_length = int.from_bytes(LORA_A[:8], "little")
    header = LORA_A[8 : 8 + header_length]
    wrong_shape = header.replace(b'"shape":[4,64]', b'"shape":[4,65]', 1)
    assert wrong_shape != header and len(wrong_shape) == len(header)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(LORA_A[:8] + wrong_shape + LORA_A[8 + header_length :])
    with pytest.raises(SafetensorError):  # the library refuses it: so must we, before anyone loads it
        with safe_open(str(damaged), framework="pt") as file:
            list(file.keys())
    with pytest.raises(UserError, match=r"^extra_lora: the .safetensors header is malformed"):
        fetch(file_server.add("/damaged.safetensors", damaged.read_bytes()))


def test_fetch_lora_stops_when_cancelled(file_server: FileServer, lora_env: Path) -> None:
    url = file_server.add("/drip.safetensors", LORA_A, ranges=False, drip=0.5)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(DownloadCancelled, match="^extra_lora: the prediction was canceled"):
        fetch_lora(url, input_name="extra_lora", cancelled=cancel.is_set)
    assert time.monotonic() - started < 1.5


def test_a_hub_5xx_is_the_hosts_fault(hub_server: HubServer) -> None:
    # 501: a 5xx that huggingface_hub does not retry with back-off (503 would take it ~20 s)
    hub_server.route(r"/api/models/alice/down/tree/.*", lambda _r: Reply(501, {}, b"not here"))
    hub_server._routes.insert(0, hub_server._routes.pop())  # before the repo routes
    with pytest.raises(HostFailed, match=r"^extra_lora: Hugging Face answered HTTP 501 when listing") as caught:
        fetch("huggingface.co/alice/down")
    assert not isinstance(caught.value, UserError)
