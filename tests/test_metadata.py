"""Images that say how they were made (FLUX_WRITE_METADATA): the records (flux/metadata.py), their files in each
format read back with PIL and with exiftool, the secrets rule, and the files unchanged with the setting off."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux.metadata import JPEG_XMP_LIMIT, image_records, record_json, shareable_source, xmp_packet
from flux.output import encoder_options, save_images
from flux.request import LoraSpec, build_request
from script.cog_inputs import predict_with_defaults
from tests.fixtures.lora_factory import make_spec, write_layout
from version import NAME, VERSION

pytest_plugins = ["tests.fixtures.servers"]

FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
NAMESPACE = "urn:flux-lora-cog:generation:1/"  # a reader's contract: changing it breaks their scripts
EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(
    EXIFTOOL is None, reason="exiftool is not installed (apt-get install libimage-exiftool-perl); CI installs it"
)
# Secrets a source or the environment may hold; none may reach a file's bytes.
SIGNATURE = "f3a9c0ffee5ignature"
SECRETS = ("hunter2", "tok-SECRET-123", SIGNATURE, "AKIAEXAMPLEKEY", "hf_ENVTOKEN42", "/srv/acme-private", "acme-private")
SIGNED_S3 = (
    "https://bucket.s3.amazonaws.com/loras/style.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIAEXAMPLEKEY%2F20250101&X-Amz-Signature={SIGNATURE}"
)
TOKEN_URL = "https://alice:hunter2@example.com/loras/extra.safetensors?token=tok-SECRET-123#part"
OPERATOR_FILE = LoraSpec("/srv/acme-private/loras/main.safetensors", 0.8, "replicate_weights", chosen_by_operator=True)


def read_with_pil(path: Path) -> dict:
    with Image.open(path) as image:
        if image.format == "PNG":
            return json.loads(image.text["parameters"])
        return json.loads(ET.fromstring(image.info["xmp"]).find(f".//{{{NAMESPACE}}}parameters").text)


def read_with_exiftool(path: Path) -> dict:
    """exiftool's own reading, the group named (PNG text chunk, or the XMP property under its prefix)."""
    found = json.loads(subprocess.run([EXIFTOOL, "-j", "-G1", "-Parameters", str(path)], capture_output=True, check=True).stdout)[0]
    group = "PNG" if path.suffix == ".png" else "XMP-flux"
    return json.loads(found[f"{group}:Parameters"])


def noise(seed: int = 1) -> Image.Image:
    """The same picture for the same seed (PIL's effect_noise is random each call)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 96, 3), dtype=np.uint8))


def records_for(**inputs) -> list[dict]:
    request = build_request(**{"prompt": "a photo of TOK", "seed": 10, "num_outputs": 2, **inputs})
    loras = list(request.loras) + [OPERATOR_FILE]
    return image_records(request, loras, precision="bf16", fused_scales=[spec.scale for spec in loras])


@pytest.mark.parametrize(
    "source, shared",
    [
        (TOKEN_URL, "https://example.com/loras/extra.safetensors"),
        (SIGNED_S3, "https://bucket.s3.amazonaws.com/loras/style.safetensors"),
        ("huggingface.co/owner/repo/resolve/main/x.safetensors?download=true", "huggingface.co/owner/repo/resolve/main/x.safetensors"),
        ("https://civitai.com/api/download/models/456?type=Model&token=tok-SECRET-123", "https://civitai.com/api/download/models/456"),
        ("civitai.com/models/123?modelVersionId=456", "civitai.com/api/download/models/456"),  # the version kept
        ("Owner/Model", "Owner/Model"),  # as the user gave it
        ("./loras/x.safetensors", "x.safetensors"),
        ("file:///home/alice/x.safetensors", "x.safetensors"),
        ("~/loras/x.safetensors", "x.safetensors"),
    ],
)
def test_a_source_is_written_as_given_without_secrets_or_server_folders(source, shared):
    assert shareable_source(LoraSpec(source, 1.0, "extra_lora")) == shared
    assert shareable_source(OPERATOR_FILE) == "main.safetensors"


def test_a_data_uri_is_written_as_its_hash_not_its_bytes():
    data = b"not really a LoRA"
    uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    assert shareable_source(LoraSpec(uri, 1.0, "extra_lora")) == f"data:sha256:{hashlib.sha256(data).hexdigest()}"


def test_one_record_per_image_with_that_image_s_seed():
    request = build_request(prompt="p", seed=41, num_outputs=3, model="schnell", go_fast=True, num_inference_steps=4,
                            guidance_scale=2.5, aspect_ratio="16:9", extra_lora=TOKEN_URL, extra_lora_scale=0.5)
    specs = [OPERATOR_FILE, *request.loras]
    records = image_records(request, specs, precision="fp8", fused_scales=[1.2, 0.75])
    assert [record["seed"] for record in records] == [41, 42, 43]
    assert records[2] == {
        "prompt": "p", "seed": 43, "model": "schnell", "mode": "txt2img", "width": 1344, "height": 768,
        "num_inference_steps": 4, "guidance_scale": 2.5, "go_fast": True, "precision": "fp8",
        "loras": [
            {"input": "replicate_weights", "source": "main.safetensors", "scale": 0.8, "fused_scale": 1.2, "deployment_default": True},
            {"input": "extra_lora", "source": "https://example.com/loras/extra.safetensors", "scale": 0.5, "fused_scale": 0.75},
        ],
        "software": NAME, "version": VERSION,
    }


def test_img2img_records_say_the_prompt_strength(tmp_path):
    source = tmp_path / "in.png"
    noise().save(source)
    record = image_records(build_request(prompt="p", image=source, prompt_strength=0.6), [], precision="fp32", fused_scales=[])[0]
    assert (record["mode"], record["prompt_strength"], record["width"], record["height"]) == ("img2img", 0.6, 96, 64)


def test_text_that_xml_or_utf8_cannot_hold_is_escaped_as_json():
    record = {"prompt": "lone \ud800 and \uffff, a <tag> & \"quotes\"", "seed": 1}
    assert json.loads(record_json(record)) == record
    packet = xmp_packet(record)
    assert json.loads(ET.fromstring(packet).find(f".//{{{NAMESPACE}}}parameters").text) == record


def test_a_prompt_too_long_for_one_jpeg_marker_is_cut_and_says_so():
    record = records_for(prompt="猫 and <dogs> " * 10_000)[0]
    packet = xmp_packet(record, max_bytes=JPEG_XMP_LIMIT)
    assert JPEG_XMP_LIMIT - 64 < len(packet) <= JPEG_XMP_LIMIT
    cut = json.loads(ET.fromstring(packet).find(f".//{{{NAMESPACE}}}parameters").text)
    assert cut["prompt_truncated"] is True and record["prompt"].startswith(cut["prompt"])
    assert {key: value for key, value in cut.items() if key not in ("prompt", "prompt_truncated")} == {
        key: value for key, value in record.items() if key != "prompt"
    }
    assert xmp_packet(record) is not None and len(xmp_packet(record)) > 100_000  # WebP has no such limit
    assert xmp_packet({**record, "loras": [{"source": "x" * JPEG_XMP_LIMIT}]}, max_bytes=JPEG_XMP_LIMIT) is None


def save_with_records(tmp_path: Path, output_format: str, records: list[dict] | None) -> list[Path]:
    return save_images([(0, noise(0)), (1, noise(1))], output_format, 80, tmp_path, records)


@pytest.mark.parametrize("output_format", FORMATS)
def test_each_file_carries_its_record_and_pil_reads_it(tmp_path, output_format):
    records = records_for(prompt="ein Foto von TOK, 猫, «quotes» & <tags>")
    paths = save_with_records(tmp_path, output_format, records)
    assert [read_with_pil(path) for path in paths] == records
    assert [Image.open(path).format for path in paths] == [FORMATS[output_format]] * 2


@needs_exiftool
@pytest.mark.parametrize("output_format", FORMATS)
def test_exiftool_reads_the_same_record(tmp_path, output_format):
    records = records_for(prompt="ein Foto von TOK, 猫, «quotes» & <tags>")
    for path, record in zip(save_with_records(tmp_path, output_format, records), records, strict=True):
        assert read_with_exiftool(path) == read_with_pil(path) == record


@pytest.mark.parametrize("output_format", FORMATS)
def test_no_token_signature_or_server_path_in_any_byte(tmp_path, monkeypatch, output_format):
    monkeypatch.setenv("HF_TOKEN", "hf_ENVTOKEN42")
    records = records_for(replicate_weights=SIGNED_S3, extra_lora=TOKEN_URL)
    assert {lora["source"] for lora in records[0]["loras"]} == {
        "https://bucket.s3.amazonaws.com/loras/style.safetensors", "https://example.com/loras/extra.safetensors", "main.safetensors"
    }
    for path in save_with_records(tmp_path, output_format, records):
        data = path.read_bytes()
        assert b"main.safetensors" in data  # the record is there, uncompressed...
        assert [secret for secret in SECRETS if secret.encode() in data] == []  # ...and holds none of these


@pytest.mark.parametrize("output_format", FORMATS)
def test_without_records_the_bytes_are_what_they_were_before(tmp_path, output_format):
    """The setting off: the file is exactly PIL's encoding with the encoder options alone, as before the setting."""
    written = save_with_records(tmp_path, output_format, None)
    for index, path in enumerate(written):
        plain = tmp_path / f"plain-{index}.{output_format}"
        noise(index).save(plain, FORMATS[output_format], **encoder_options(output_format, 80))
        assert path.read_bytes() == plain.read_bytes()
        with Image.open(path) as image:
            assert "xmp" not in image.info and "parameters" not in image.info


# ---------------------------------------------------------------- through FluxGenerator on the tiny weights

RUN = {"prompt": "a photo of TOK, 猫", "num_inference_steps": 2, "megapixels": "0.25", "disable_safety_checker": True}
SHORT_DTYPE = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}


@pytest.fixture
def served_with_a_token(predictor, file_server, tmp_path):
    """An extra LoRA at a URL with user info, a token in its query and a fragment."""
    transformer = predictor.generator.pipelines.transformer("dev")
    path = write_layout("diffusers", make_spec(transformer, seed=4, magnitude=0.5), transformer, tmp_path / "extra.safetensors")
    plain = file_server.add("/extra.safetensors", path.read_bytes())
    return plain.replace("http://", "http://alice:hunter2@") + "?token=tok-SECRET-123#part", plain


@pytest.fixture(scope="module")
def deployed(predictor, tmp_path_factory):
    """A deployment whose main LoRA is the operator's local file, in a folder whose name must not leak."""
    from predict import Predictor

    folder = tmp_path_factory.mktemp("srv") / "acme-private"
    folder.mkdir()
    transformer = predictor.generator.pipelines.transformer("dev")
    main = write_layout("diffusers", make_spec(transformer, seed=3, magnitude=0.5), transformer, folder / "main.safetensors")
    instance = Predictor()
    instance.setup(weights=str(main))
    return instance


@pytest.mark.parametrize("output_format", FORMATS)
def test_generated_files_say_how_they_were_made_and_nothing_secret(deployed, served_with_a_token, monkeypatch, output_format):
    monkeypatch.setenv("FLUX_WRITE_METADATA", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_ENVTOKEN42")
    url, plain = served_with_a_token
    paths = predict_with_defaults(deployed, **RUN, seed=31, num_outputs=2, output_format=output_format, lora_scale=0.8,
                                  extra_lora=url, extra_lora_scale=0.5)
    expected = {
        "prompt": RUN["prompt"], "model": "dev", "mode": "txt2img", "width": 512, "height": 512, "num_inference_steps": 2,
        "guidance_scale": 3.0, "go_fast": False, "precision": SHORT_DTYPE[str(deployed.generator.dtype)],
        "loras": [
            {"input": "replicate_weights", "source": "main.safetensors", "scale": 0.8, "deployment_default": True},
            {"input": "extra_lora", "source": plain, "scale": 0.5},
        ],
        "software": NAME, "version": VERSION,
    }
    assert [read_with_pil(path) for path in paths] == [{**expected, "seed": 31}, {**expected, "seed": 32}]
    for path in paths:
        if EXIFTOOL:
            assert read_with_exiftool(path) == read_with_pil(path)
        data = path.read_bytes()
        assert [secret for secret in SECRETS if secret.encode() in data] == []


def test_the_record_says_what_ran_fp8_or_its_fallback(predictor, tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_WRITE_METADATA", "1")
    monkeypatch.setenv("FLUX_GO_FAST_LORA_MULTIPLIER", "1.5")
    monkeypatch.setenv("FLUX_LORA_LOCAL_DIRS", str(tmp_path))
    transformer = predictor.generator.pipelines.transformer("dev")
    lora = write_layout("diffusers", make_spec(transformer, seed=5, magnitude=0.5), transformer, tmp_path / "style.safetensors")
    common = {**RUN, "num_inference_steps": 1, "go_fast": True, "replicate_weights": str(lora), "lora_scale": 0.5, "output_format": "png"}
    fp8 = read_with_pil(predict_with_defaults(predictor, **common, aspect_ratio="21:9")[0])
    fallback = read_with_pil(predict_with_defaults(predictor, **common, aspect_ratio="custom", width=256, height=256)[0])
    assert (fp8["precision"], fp8["loras"]) == ("fp8", [{"input": "replicate_weights", "source": "style.safetensors", "scale": 0.5, "fused_scale": 0.75}])
    assert (fallback["precision"], fallback["go_fast"]) == (SHORT_DTYPE[str(predictor.generator.dtype)], True)
    assert fallback["loras"] == [{"input": "replicate_weights", "source": "style.safetensors", "scale": 0.5}]


@pytest.mark.parametrize("output_format", FORMATS)
def test_with_the_setting_off_files_hold_pixels_only_and_the_same_pixels(predictor, monkeypatch, output_format):
    off = predict_with_defaults(predictor, **RUN, seed=8, output_format=output_format)[0]
    off_bytes = off.read_bytes()
    monkeypatch.setenv("FLUX_WRITE_METADATA", "1")
    on = predict_with_defaults(predictor, **RUN, seed=8, output_format=output_format)[0]
    assert read_with_pil(on)["seed"] == 8
    with Image.open(io.BytesIO(off_bytes)) as plain, Image.open(on) as described:
        assert "xmp" not in plain.info and "parameters" not in plain.info
        assert np.array_equal(np.asarray(plain), np.asarray(described))
    assert RUN["prompt"].encode() not in off_bytes
