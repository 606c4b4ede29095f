"""A catalogue of bad inputs, each sent to the real coglet server as a hosted deployment runs it.

Every case ends in a 422 (coglet's schema check) or a failed prediction whose message names the input, and every
case is followed by a good request that must succeed: no bad input breaks the server or leaks into the next one.

The server: private URLs off, no local file folders, and the Hub, CivitAI and Replicate base URLs pointed at local
protocol servers (operator-configured hosts may be on loopback; user URLs may not). LoRA files travel as data URIs
or from those hosts, so no case depends on the network. LoRA cases only require "fails, naming the input": their
exact wording belongs to the LoRA and downloader code.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import tarfile
import zlib
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.fixtures.cog_server import start_cog_server, stop_cog_server
from tests.fixtures.lora_factory import (
    make_spec,
    sdxl_tensors,
    unmatched_tensors,
    write_layout,
    write_pickle,
    write_tensors,
)
from tests.fixtures.servers import PICKLE_BYTES, CivitaiServer, CivitaiVersion, HubServer, ReplicateServer, make_tar

GOOD = {"prompt": "x", "num_inference_steps": 1, "aspect_ratio": "custom", "width": 256, "height": 256, "seed": 1}
VERSION = "a" * 64


def uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(size=(300, 200), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 90)).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tar_with(*members: tarfile.TarInfo, files: dict[str, bytes] | None = None) -> bytes:
    return make_tar(files or {}, list(members))


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """The LoRA files and the local hosts the cases use, built once."""
    from weights.tiny.flux import tiny_transformer

    folder = tmp_path_factory.mktemp("catalogue")
    transformer = tiny_transformer(guidance_embeds=True)
    good = write_layout("kohya", make_spec(transformer, seed=2), transformer, folder / "good.safetensors").read_bytes()
    nan_tensors = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((4, 64), float("nan")),
                   "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(64, 4)}
    kit = SimpleNamespace(
        good=good,
        sdxl=write_tensors(sdxl_tensors(), folder / "sdxl.safetensors").read_bytes(),
        unmatched=write_tensors(unmatched_tensors(), folder / "llm.safetensors").read_bytes(),
        nan=write_tensors(nan_tensors, folder / "nan.safetensors").read_bytes(),
        zip_pickle=write_pickle(folder / "lora.pt").read_bytes(),
        hub=HubServer(),
        civitai=CivitaiServer(),
        replicate=ReplicateServer(),
        folder=folder,
    )
    kit.hub.add_repo("owner/pickled", {"pytorch_lora_weights.bin": kit.zip_pickle})
    kit.hub.add_repo("owner/two-loras", {"a/one.safetensors": good, "b/two.safetensors": good})
    kit.hub.add_repo("owner/sdxl", {"lora.safetensors": kit.sdxl})
    kit.hub.add_repo("owner/secret", {"lora.safetensors": good}, private=True)
    kit.hub.add_repo("owner/empty", {"README.md": b"# nothing here"})
    kit.civitai.add_model(11, [CivitaiVersion(111, kit.zip_pickle, filename="lora.pt", format="PickleTensor")])
    kit.civitai.add_model(12, [CivitaiVersion(121, b"<html>not a model</html>")])
    kit.replicate.add_weights("owner", "escape", VERSION, tar_with(member("../../evil.safetensors"), files={}))
    kit.replicate.add_weights("owner", "nothing", VERSION, make_tar({"README.md": b"hi"}))
    kit.replicate.add_weights("owner", "private", VERSION, make_tar({"lora.safetensors": good}), private=True)
    yield kit
    for host in (kit.hub, kit.civitai, kit.replicate):
        host.close()


@pytest.fixture(scope="module")
def server(tiny_weights, kit, tmp_path_factory):
    env = {
        "FLUX_ALLOW_PRIVATE_URLS": "",
        "FLUX_INPUT_LOCAL_DIRS": "",
        "FLUX_LORA_LOCAL_DIRS": "",
        "HF_ENDPOINT": kit.hub.url,
        "HF_TOKEN": "",
        "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),
        "FLUX_CIVITAI_BASE_URL": kit.civitai.url,
        "CIVITAI_API_TOKEN": "",
        "FLUX_REPLICATE_BASE_URL": kit.replicate.url,
        "REPLICATE_API_TOKEN": "",
        "FLUX_LORA_CACHE_DIR": str(tmp_path_factory.mktemp("lora_cache")),
        "FLUX_DOWNLOAD_RETRIES": "0",
    }
    running = start_cog_server(tmp_path_factory.mktemp("coglet"), env)
    yield running
    stop_cog_server(running)


def expect(server, inputs: dict, outcome: str, name: str, then_a_good_request: bool = True) -> None:
    response = server.predict(input=inputs, timeout=120)
    if outcome == "422":
        assert response.status_code == 422, response.text
        assert name in json.dumps(response.json()["detail"]), response.text
    else:
        body = response.json()
        assert response.status_code == 200 and body["status"] == "failed", body
        assert f"{name}:" in body["error"] or f"{name} " in body["error"], body["error"]
    if then_a_good_request:
        assert_good_request_runs(server)


def assert_good_request_runs(server) -> None:
    good = server.predict(input=GOOD, timeout=120).json()
    assert good["status"] == "succeeded", good


# --- rejected by coglet's schema check (422) ------------------------------------------------------------------

SCHEMA_CASES = [
    ("prompt", None), ("prompt", 7), ("prompt", ["a"]),
    ("num_outputs", 0), ("num_outputs", 5), ("num_outputs", "two"), ("num_outputs", 1.5),
    ("num_inference_steps", 0), ("num_inference_steps", 51), ("num_inference_steps", "many"),
    ("guidance_scale", -0.1), ("guidance_scale", 10.5), ("guidance_scale", "high"),
    ("prompt_strength", -0.1), ("prompt_strength", 1.01),
    ("output_quality", -1), ("output_quality", 101),
    ("lora_scale", -1.5), ("lora_scale", 3.5), ("extra_lora_scale", 4),
    ("width", 100), ("width", 2000), ("height", 255), ("height", "tall"),
    ("aspect_ratio", "7:5"), ("aspect_ratio", ""), ("output_format", "gif"), ("model", "pro"),
    ("megapixels", "2"), ("megapixels", 1), ("seed", "seven"), ("seed", 1.5),
    ("go_fast", "yes please"), ("disable_safety_checker", "no"),
]


@pytest.mark.parametrize("name, value", SCHEMA_CASES, ids=[f"{n}={v!r}" for n, v in SCHEMA_CASES])
def test_schema_rejections(server, name, value):
    # a 422 never reaches the predictor; one good request after the group (below) shows the server is fine
    expect(server, {**GOOD, name: value}, "422", name, then_a_good_request=False)


def test_missing_prompt(server):
    expect(server, {k: v for k, v in GOOD.items() if k != "prompt"}, "422", "prompt", then_a_good_request=False)


def test_a_good_request_after_the_schema_rejections(server):
    assert_good_request_runs(server)


# --- failed predictions that name the input --------------------------------------------------------------------

REQUEST_CASES = {
    "empty prompt": ({"prompt": "   "}, "prompt"),
    "custom size without height": ({"height": None}, "aspect_ratio"),
    "seed beyond 64 bits": ({"seed": 2**63}, "seed"),
    "mask without an image": ({"mask": uri(png(), "image/png")}, "mask"),
}

IMAGE_CASES = {
    "text as png": ({"image": uri(b"just some text", "image/png")}, "image"),
    "empty file": ({"image": "data:image/png;base64,"}, "image"),
    "truncated png": ({"image": uri(png((400, 400))[:200], "image/png")}, "image"),
    "one pixel": ({"image": uri(png((1, 1)), "image/png")}, "image"),
    "far too small": ({"image": uri(png((8, 600)), "image/png")}, "image"),
    "pixel bomb": ({"image": uri(png_declaring(100_000, 100_000), "image/png")}, "image"),
    "over the pixel cap": ({"image": uri(png_declaring(9_000, 6_000), "image/png")}, "image"),
    "bad mask": ({"image": uri(png(), "image/png"), "mask": uri(b"GIF89a broken", "image/gif")}, "mask"),
    "server file": ({"image": "/etc/passwd"}, "image"),
    "server device": ({"image": "/dev/stdin"}, "image"),
    "server folder": ({"image": "/tmp"}, "image"),
    "missing server file": ({"image": "/no/such/photo.png"}, "image"),
    "file URL": ({"image": "file:///etc/hostname"}, "image"),
    "server file as mask": ({"image": uri(png(), "image/png"), "mask": "/etc/passwd"}, "mask"),
}

LORA_CASES = {
    # sources that are refused before anything is fetched
    "pickle suffix URL": ("extra_lora", lambda kit: "https://example.com/lora.ckpt"),
    "pickle suffix on the Hub": ("replicate_weights", lambda kit: "huggingface.co/owner/repo/lora.bin"),
    "ftp URL": ("extra_lora", lambda kit: "ftp://example.com/lora.safetensors"),
    "malformed IPv6 URL": ("extra_lora", lambda kit: "http://[::1/bad"),
    "port out of range": ("extra_lora", lambda kit: "http://h:99999/x.safetensors"),
    "local path": ("extra_lora", lambda kit: "/etc/passwd"),
    "file URL": ("replicate_weights", lambda kit: "file:///etc/passwd"),
    "home path": ("extra_lora", lambda kit: "~/.ssh/id_rsa"),
    "gibberish": ("replicate_weights", lambda kit: "this is not a source at all"),
    # private addresses for a user URL
    "loopback": ("extra_lora", lambda kit: "http://127.0.0.1:9/lora.safetensors"),
    "localhost name": ("extra_lora", lambda kit: "http://localhost:9/lora.safetensors"),
    "IPv6 loopback": ("extra_lora", lambda kit: "http://[::1]:9/lora.safetensors"),
    "metadata service": ("extra_lora", lambda kit: "http://169.254.169.254/latest/meta-data/x.safetensors"),
    "private range": ("replicate_weights", lambda kit: "http://10.0.0.1/lora.safetensors"),
    "decimal loopback": ("extra_lora", lambda kit: "http://2130706433/lora.safetensors"),
    # bad files given as data URIs
    "pickle bytes": ("extra_lora", lambda kit: uri(PICKLE_BYTES)),
    "torch zip pickle": ("extra_lora", lambda kit: uri(kit.zip_pickle)),
    "garbage": ("replicate_weights", lambda kit: uri(b"\x00garbage" * 50)),
    "empty data URI": ("extra_lora", lambda kit: "data:application/octet-stream;base64,"),
    "broken base64": ("extra_lora", lambda kit: "data:application/octet-stream;base64,@@@@"),
    "header length beyond the file": ("extra_lora", lambda kit: uri(struct.pack("<Q", 10**12) + b"{}")),
    "header not JSON": ("extra_lora", lambda kit: uri(struct.pack("<Q", 8) + b"not json")),
    "truncated safetensors": ("extra_lora", lambda kit: uri(kit.good[: len(kit.good) // 2])),
    "SDXL LoRA": ("extra_lora", lambda kit: uri(kit.sdxl)),
    "language-model LoRA": ("replicate_weights", lambda kit: uri(kit.unmatched)),
    "NaN LoRA": ("extra_lora", lambda kit: uri(kit.nan)),
    # tars that must not be unpacked
    "tar path traversal": ("extra_lora", lambda kit: uri(tar_with(member("../evil.safetensors")))),
    "tar absolute path": ("extra_lora", lambda kit: uri(tar_with(member("/tmp/evil.safetensors")))),
    "tar symlink": ("extra_lora", lambda kit: uri(tar_with(member("lora.safetensors", tarfile.SYMTYPE, "/etc/passwd")))),
    "tar hard link": ("extra_lora", lambda kit: uri(tar_with(member("lora.safetensors", tarfile.LNKTYPE, "/etc/passwd")))),
    "tar device": ("extra_lora", lambda kit: uri(tar_with(member("lora.safetensors", tarfile.CHRTYPE)))),
    "tar with two LoRAs": ("extra_lora", lambda kit: uri(make_tar({"a.safetensors": kit.good, "b.safetensors": kit.good}))),
    "tar with no LoRA": ("extra_lora", lambda kit: uri(make_tar({"README.md": b"hello"}))),
    "tar holding a pickle": ("extra_lora", lambda kit: uri(make_tar({"lora.ckpt": kit.zip_pickle}))),
    # the hosts: missing, private, pickles, ambiguity
    "Hub repo missing": ("replicate_weights", lambda kit: "huggingface.co/owner/no-such-repo"),
    "Hub private repo": ("replicate_weights", lambda kit: "huggingface.co/owner/secret"),
    "Hub repo with only a pickle": ("extra_lora", lambda kit: "huggingface.co/owner/pickled"),
    "Hub repo with two LoRAs": ("extra_lora", lambda kit: "huggingface.co/owner/two-loras"),
    "Hub repo without LoRA": ("extra_lora", lambda kit: "huggingface.co/owner/empty"),
    "Hub SDXL LoRA": ("extra_lora", lambda kit: "huggingface.co/owner/sdxl"),
    "CivitAI model missing": ("extra_lora", lambda kit: "civitai.com/models/999"),
    "CivitAI pickle model": ("extra_lora", lambda kit: "civitai.com/models/11"),
    "CivitAI file not a model": ("extra_lora", lambda kit: "civitai.com/models/12"),
    "Replicate model missing": ("replicate_weights", lambda kit: "owner/no-such-model"),
    "Replicate private model": ("replicate_weights", lambda kit: "owner/private"),
    "Replicate tar escaping": ("replicate_weights", lambda kit: "owner/escape"),
    "Replicate tar without LoRA": ("replicate_weights", lambda kit: f"owner/nothing/{VERSION}"),
}


@pytest.mark.parametrize("case", list(REQUEST_CASES) + [f"image: {c}" for c in IMAGE_CASES])
def test_request_and_image_failures(server, case):
    inputs, name = REQUEST_CASES.get(case) or IMAGE_CASES[case.removeprefix("image: ")]
    request = {**GOOD, **inputs}
    expect(server, {k: v for k, v in request.items() if v is not None}, "failed", name)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_failures(server, kit, case):
    name, source = LORA_CASES[case]
    expect(server, {**GOOD, name: source(kit)}, "failed", name)


def test_the_lora_channels_work_for_a_good_file(server, kit):
    """Positive control: the same data-URI and Hub routes accept a good LoRA, so the failures above are real."""
    kit.hub.add_repo("owner/good", {"lora.safetensors": kit.good})
    for name, source in (("extra_lora", uri(kit.good)), ("replicate_weights", "huggingface.co/owner/good")):
        body = server.predict(input={**GOOD, name: source}, timeout=120).json()
        assert body["status"] == "succeeded", body

