"""Parsing LoRA source strings: every accepted form, the odd spellings, and the refusals."""

from __future__ import annotations

import base64

import pytest

from errors import UserError
from lora.sources import (
    CivitAISource,
    DataUriSource,
    HuggingFaceSource,
    LocalPathSource,
    ReplicateSource,
    UrlSource,
    parse_source,
)

VERSION = "5" * 32 + "a" * 32


def parse(text: str):
    return parse_source(text, input_name="extra_lora")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice/flux-style", ReplicateSource("alice", "flux-style")),
        ("  Alice/Flux-Style/ ", ReplicateSource("alice", "flux-style")),
        (f"alice/flux-style/{VERSION}", ReplicateSource("alice", "flux-style", VERSION)),
        (f"alice/flux-style:{VERSION}", ReplicateSource("alice", "flux-style", VERSION)),
        (f"alice/flux-style:{VERSION.upper()}", ReplicateSource("alice", "flux-style", VERSION)),
        ("alice/flux.v2", ReplicateSource("alice", "flux.v2")),
        ("replicate.com/alice/flux-style", ReplicateSource("alice", "flux-style")),
        ("https://www.replicate.com/alice/flux-style/", ReplicateSource("alice", "flux-style")),
        (f"https://replicate.com/alice/flux-style/versions/{VERSION}", ReplicateSource("alice", "flux-style", VERSION)),
        (
            f"https://replicate.com/alice/flux-style/versions/{VERSION}/_weights",
            ReplicateSource("alice", "flux-style", VERSION),
        ),
    ],
)
def test_replicate_forms(text: str, expected: ReplicateSource) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("huggingface.co/alice/style", HuggingFaceSource("alice/style")),
        ("https://huggingface.co/alice/style", HuggingFaceSource("alice/style")),
        ("http://huggingface.co/alice/style/", HuggingFaceSource("alice/style")),
        ("https://www.huggingface.co/alice/style", HuggingFaceSource("alice/style")),
        ("HTTPS://HuggingFace.co/alice/style", HuggingFaceSource("alice/style")),
        ("hf.co/alice/style", HuggingFaceSource("alice/style")),
        ("huggingface.co/alice/style/lora.safetensors", HuggingFaceSource("alice/style", None, "lora.safetensors")),
        ("huggingface.co/alice/style/tree/dev", HuggingFaceSource("alice/style", "dev")),
        (
            "https://huggingface.co/alice/style/blob/main/sub/dir/my%20lora.safetensors",
            HuggingFaceSource("alice/style", "main", "sub/dir/my lora.safetensors"),
        ),
        (
            "https://huggingface.co/alice/style/resolve/0123abc/lora.safetensors?download=true",
            HuggingFaceSource("alice/style", "0123abc", "lora.safetensors"),
        ),
        ("huggingface.co/alice/style#readme", HuggingFaceSource("alice/style")),
    ],
)
def test_huggingface_forms(text: str, expected: HuggingFaceSource) -> None:
    assert parse(text) == expected


def test_huggingface_spellings_share_a_cache_key() -> None:
    keys = {
        parse(text).cache_key
        for text in ("huggingface.co/a/b", "https://huggingface.co/a/b/", "http://www.huggingface.co/a/b", "hf.co/a/b")
    }
    assert keys == {"hf:a/b@main:*"}
    assert parse("huggingface.co/a/b/x.safetensors").cache_key != parse("huggingface.co/a/b").cache_key
    assert parse("huggingface.co/a/b/resolve/v2/x.safetensors").cache_key == "hf:a/b@v2:x.safetensors"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("civitai.com/models/12345", CivitAISource(model_id="12345")),
        ("https://civitai.com/models/12345/flux-style-lora", CivitAISource(model_id="12345")),
        ("https://www.civitai.com/models/12345/", CivitAISource(model_id="12345")),
        ("https://civitai.com/models/12345?modelVersionId=67890", CivitAISource("12345", "67890")),
        ("https://civitai.com/models/12345/slug?modelVersionId=67890&x=1", CivitAISource("12345", "67890")),
        ("civitai.com/api/download/models/67890", CivitAISource(version_id="67890")),
        (
            "http://civitai.com/api/download/models/67890?type=Model&format=SafeTensor",
            CivitAISource(version_id="67890"),
        ),
    ],
)
def test_civitai_forms(text: str, expected: CivitAISource) -> None:
    assert parse(text) == expected


def test_civitai_version_is_the_cache_key_when_known() -> None:
    by_version = {
        parse(t).cache_key for t in ("civitai.com/models/1?modelVersionId=2", "civitai.com/api/download/models/2")
    }
    assert by_version == {"civitai:version:2"}
    assert parse("civitai.com/models/1/slug").cache_key == "civitai:model:1"


@pytest.mark.parametrize(
    ("text", "expected_url"),
    [
        ("https://example.com/loras/style.safetensors", "https://example.com/loras/style.safetensors"),
        ("https://EXAMPLE.com:443/a.safetensors?sig=abc&exp=1", "https://example.com/a.safetensors?sig=abc&exp=1"),
        ("http://example.com:80/a.safetensors", "http://example.com/a.safetensors"),
        ("https://example.com:0443/a.safetensors", "https://example.com/a.safetensors"),
        ("https://[::1]:443/a.safetensors", "https://[::1]/a.safetensors"),
        (
            "https://replicate.delivery/xezq/abc/trained_model.tar",
            "https://replicate.delivery/xezq/abc/trained_model.tar",
        ),
        ("https://example.com/download?id=5", "https://example.com/download?id=5"),
    ],
)
def test_plain_urls(text: str, expected_url: str) -> None:
    source = parse(text)
    assert source == UrlSource(expected_url)


def test_url_display_hides_the_query_and_user_info() -> None:
    source = parse("https://user:secret@example.com/a.safetensors?X-Amz-Signature=topsecret")
    assert isinstance(source, UrlSource)
    assert "topsecret" not in source.display and "secret" not in source.display
    assert source.display == "https://example.com/a.safetensors?..."


@pytest.mark.parametrize(
    "text",
    [
        "https://user:s3cret@example.com/a b.safetensors",  # spaces
        "https://user:s3cret@example.com:99999/a.safetensors",  # port out of range
        "https://user:s3cret@example.com:0/a.safetensors",
        "https://user:s3cret@[::1/a.safetensors",  # a broken IPv6 host
        "https://user:s3cret@/a.safetensors",  # no host
        "https://user:s3cret@huggingface.co/datasets/a/b",
        "https://user:s3cret@huggingface.co/a",
        "https://user:s3cret@civitai.com/images/1",
        "https://user:s3cret@replicate.com/a",
        "user:s3cret@example.com/thing",  # no scheme
        "user:s3cret@example.com/a b?x=1",
    ],
)
def test_parse_errors_never_show_a_password(text: str) -> None:
    with pytest.raises(UserError) as caught:
        parse(text)
    assert "s3cret" not in str(caught.value) and "user:" not in str(caught.value)


def test_ipv6_hosts_keep_their_brackets_when_shown() -> None:
    source = parse("https://user:pw@[::1]:8443/x.safetensors?sig=1")
    assert isinstance(source, UrlSource)
    assert source.display == "https://[::1]:8443/x.safetensors?..."
    with pytest.raises(UserError, match=r"https://\[::1\]:8443/a b\.safetensors"):
        parse("https://[::1]:8443/a b.safetensors")


def test_data_uris() -> None:
    payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    source = parse("data:application/octet-stream;base64," + base64.b64encode(payload).decode())
    assert source == DataUriSource(payload)
    assert parse("data:,hello%20world") == DataUriSource(b"hello world")
    assert source.cache_key.startswith("data:sha256:")
    assert "base64" not in source.display


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/src/loras/style.safetensors", "/src/loras/style.safetensors"),
        ("./loras/../loras/style.safetensors", "./loras/style.safetensors"),
        ("../style.safetensors", "../style.safetensors"),
        ("~/loras/style.safetensors", "~/loras/style.safetensors"),
        ("file:///src/my%20loras/style.safetensors", "/src/my loras/style.safetensors"),
        ("loras/style.safetensors", "loras/style.safetensors"),
        ("style.safetensors", "style.safetensors"),
        ("/weights/trained_model.tar", "/weights/trained_model.tar"),
    ],
)
def test_local_paths(text: str, expected: str) -> None:
    assert parse(text) == LocalPathSource(expected)


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/model.ckpt",
        "https://example.com/model.pt?download=1",
        "huggingface.co/alice/style/resolve/main/pytorch_lora_weights.bin",
        "huggingface.co/alice/style/model.pth",
        "/src/loras/style.ckpt",
        "style.pkl",
    ],
)
def test_pickle_formats_are_refused_before_download(text: str) -> None:
    with pytest.raises(UserError, match=r"^extra_lora: .*pickles.*only \.safetensors"):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("just-a-word", "cannot tell"),
        ("example.com/style.safetensors", "cannot tell"),
        ("ftp://example.com/a.safetensors", "unsupported URL scheme"),
        ("s3://bucket/a.safetensors", "unsupported URL scheme"),
        ("huggingface.co/alice", "not a Hugging Face model repo"),
        ("huggingface.co/datasets/alice/data", "dataset"),
        ("huggingface.co/alice/style/blob/main", "names no file"),
        ("huggingface.co/alice/style/tree/main/sub", "folder"),
        ("civitai.com/posts/123", "not a CivitAI model link"),
        ("civitai.com/models/abc", "not a CivitAI model link"),
        ("civitai.com/models/1?modelVersionId=x", "must be a number"),
        ("replicate.com/alice", "not a Replicate model"),
        ("replicate.com/alice/style/versions/nothex", "not a Replicate model"),
        ("data:application/octet-stream;base64,@@@", "not valid base64"),
        ("data:nocomma", "no comma"),
        ("https:///nohost.safetensors", "no host"),
    ],
)
def test_unrecognised_strings_get_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as caught:
        parse(text)
    assert str(caught.value).startswith("extra_lora: ")


def test_errors_do_not_echo_query_strings() -> None:
    with pytest.raises(UserError) as caught:
        parse("civitai.com/posts/1?token=very-secret-token")
    assert "very-secret-token" not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "http://[::1/bad",  # urllib: "Invalid IPv6 URL"
        "http://h:99999/x.safetensors",  # urllib: "Port out of range"
        "https://h:0/x.safetensors",
        "http://h:abc/x.safetensors",  # urllib: "Port could not be cast to integer value"
        "https://[not-an-ip]/x.safetensors",
        "https://huggingface.co:99999/alice/style",
        "civitai.com:abc/models/1",
        "http://exa mple.com/x.safetensors",
        "http://example.com/x\x00.safetensors",
        "http://example..com/x.safetensors",
        "http://" + "a" * 64 + ".com/x.safetensors",
        "https://:443/x.safetensors",
    ],
)
def test_malformed_urls_are_user_errors_naming_the_input(text: str) -> None:
    with pytest.raises(UserError, match=r"^extra_lora: ") as caught:
        parse(text)
    assert "Invalid IPv6" not in str(caught.value) and "out of range" not in str(caught.value)
