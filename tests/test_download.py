"""The generic downloader and cache (lora.download) against local HTTP servers: ranges, resume, failures and
whose fault they are, the address guard, stalls and cancel, concurrency, kill -9, cache damage and eviction."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from errors import UpstreamError, UserError
from lora.download.addresses import is_public_address
from lora.download.cache import FileCache, LargerThanCache, Work
from lora.download.checks import check_safetensors, extract_single_safetensors, sniff_format
from lora.download.config import DownloadSettings
from lora.download.downloader import Downloader
from lora.download.errors import DownloadCancelled, DownloadError, DownloadStalled, HostFailed, HTTPStatusError
from lora.download.monitor import TransferMonitor
from lora.download.redaction import install_redaction, redact_url
from lora.fetch import lora_downloader
from settings import SETTINGS, TRUSTED_BASE_URL_SETTINGS
from tests.fixtures.servers import PICKLE_BYTES, FileServer, Reply, make_safetensors, make_tar
from units import MiB

pytest_plugins = ["tests.fixtures.servers"]

REPO_ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


def settings(**changes: object) -> DownloadSettings:
    base: dict[str, object] = {
        "allow_private": True,
        "retries": 0,
        "retry_backoff_s": 0.01,
        "connections": 4,
        "probe_bytes": 64 * KIB,
        "progress_interval_s": 0.05,
    }
    return DownloadSettings(**{**base, **changes})  # type: ignore[arg-type]


def downloader(tmp_path: Path, *, cache: FileCache | None = None, **changes: object) -> Downloader:
    return Downloader(cache or FileCache(tmp_path / "cache", max_bytes=0), settings(**changes))


def fetch(dl: Downloader, url: str, key: str = "k", **options: object):
    return dl.fetch(url, key=key, input_name="extra_lora", max_size=options.pop("max_size", 10**8), **options)  # type: ignore[arg-type]


def payload(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(size)


def entries(cache_root: Path) -> list[Path]:
    return sorted((cache_root / "entries").iterdir())


class _NotCached(Exception):
    pass


def is_cached(cache: FileCache, key: str) -> bool:
    """Whether `key` has a valid entry, asked the way fetches ask: on a miss the producer refuses to produce
    (and leaves an unfinished download as it was)."""

    def refuse(work: Work) -> Path:
        if any(work.dir.iterdir()):
            work.keep_for_resume()
        raise _NotCached

    try:
        cache.get_or_create(key, refuse, description=key)
    except _NotCached:
        return False
    return True


# ---------------------------------------------------------------- ranges and streams


def test_ranged_download_uses_several_connections(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(1_000_000)
    url = file_server.add("/lora.bin", data)
    dl = downloader(tmp_path)

    first = fetch(dl, url)
    assert first.path.read_bytes() == data and first.size == len(data) and not first.cache_hit
    gets = file_server.requests_for("/lora.bin")
    assert len(gets) > 4 and all(r.headers.get("range", "").startswith("bytes=") for r in gets)
    assert len({r.client_port for r in gets}) > 1  # parallel connections, not one after another

    again = fetch(dl, url)
    assert again.cache_hit and again.path == first.path
    assert len(file_server.requests_for("/lora.bin")) == len(gets)  # a hit makes no request


def test_server_without_range_support_gets_one_clean_stream(
    file_server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(700_000)
    url = file_server.add("/plain.bin", data, ranges=False)
    with caplog.at_level(logging.INFO):
        result = fetch(downloader(tmp_path), url)
    assert result.path.read_bytes() == data
    assert len(file_server.requests_for("/plain.bin")) == 1
    assert "does not support ranges" in caplog.text


def test_body_without_content_length_is_read_to_the_end(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(300_000)
    url = file_server.add("/chunked.bin", data, ranges=False, content_length=False)
    assert fetch(downloader(tmp_path), url).path.read_bytes() == data


def test_progress_is_logged(file_server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = file_server.add("/slow.bin", payload(400_000), rate=2_000_000)
    with caplog.at_level(logging.INFO, logger="lora.download.monitor"):
        fetch(downloader(tmp_path, connections=2), url)
    assert any("downloading http://127.0.0.1" in m and "% of" in m for m in caplog.messages)


# ---------------------------------------------------------------- failures leave nothing behind


@pytest.mark.parametrize("ranges", [True, False])
def test_server_breaking_mid_body_gives_a_clear_error_and_no_entry(
    file_server: FileServer, tmp_path: Path, ranges: bool
) -> None:
    url = file_server.add("/broken.bin", payload(500_000), ranges=ranges, break_after=30_000)  # every response
    dl = downloader(tmp_path, retries=1)
    with pytest.raises(
        HostFailed, match=r"^extra_lora: could not download http://127.0.0.1:\d+/broken.bin: .*closed"
    ) as caught:
        fetch(dl, url)
    assert "Try again later" in str(caught.value) and not isinstance(caught.value, UserError)
    assert entries(dl.cache.root) == []
    assert not is_cached(dl.cache, "k")
    assert len(file_server.requests_for("/broken.bin")) >= 2  # it was tried again


def test_resume_after_a_failure_fetches_only_the_missing_chunks(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(1_000_000)
    url = file_server.add("/flaky.bin", data)
    calls = {"n": 0}
    good = file_server.files["/flaky.bin"]

    def flaky(request: object) -> Reply:
        calls["n"] += 1
        if calls["n"] == 4:  # one chunk breaks; the others complete
            return Reply(good.status, good.headers, good.body, ranges=True, break_after=1000)
        return good

    file_server._routes.insert(0, (("GET",), __import__("re").compile("/flaky.bin"), flaky))
    dl = downloader(tmp_path, connections=2)
    with pytest.raises(DownloadError):
        fetch(dl, url)
    sent_before = file_server.bytes_sent["/flaky.bin"]

    result = fetch(dl, url)
    assert result.path.read_bytes() == data and not result.cache_hit
    assert file_server.bytes_sent["/flaky.bin"] - sent_before < len(data)  # resumed, not restarted


def test_a_stale_partial_download_is_not_reused(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(400_000)
    url = file_server.add("/changed.bin", data)
    dl = downloader(tmp_path)
    work = dl.cache.root / "partial" / FileCache.key_hash("k")
    work.mkdir(parents=True)
    (work / "download.part").write_bytes(b"\xff" * len(data))
    chunks = [[start, min(start + 65536, len(data))] for start in range(0, len(data), 65536)]
    (work / "resume.json").write_text(json.dumps({"total": len(data), "validator": 'etag:"old"', "chunks": chunks}))
    (work / "resume.done").write_text("".join(f"{i}\n" for i in range(len(chunks))))
    assert fetch(dl, url).path.read_bytes() == data


def test_size_cap_with_a_known_length_stops_before_the_body(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/big.bin", payload(2_000_000))
    dl = downloader(tmp_path)
    with pytest.raises(DownloadError, match=r"larger than the 0.1 MB limit"):
        fetch(dl, url, max_size=100_000)
    assert len(file_server.requests_for("/big.bin")) == 1 and entries(dl.cache.root) == []


def test_size_cap_without_a_length_stops_mid_stream(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/big.bin", payload(3_000_000), ranges=False, content_length=False)
    dl = downloader(tmp_path)
    with pytest.raises(DownloadError, match="larger than the 0.5 MB limit"):
        fetch(dl, url, max_size=500_000)
    assert entries(dl.cache.root) == [] and not (dl.cache.root / "partial" / FileCache.key_hash("k")).exists()


def test_a_host_that_sends_nothing_fails_after_one_stall_timeout(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/late.bin", payload(10_000), delay=3)
    started = time.monotonic()
    with pytest.raises(DownloadStalled, match=r"127.0.0.1 sent nothing for 0.5 s|stalled: less than 16 KiB arrived in 0.5 s"):
        fetch(downloader(tmp_path, stall_timeout_s=0.5, retries=2), url)
    assert time.monotonic() - started < 1.5
    assert len(file_server.requests_for("/late.bin")) == 1  # a stall is not retried


def test_overall_deadline_stops_a_trickling_server(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/trickle.bin", payload(2_000_000), rate=100_000)
    started = time.monotonic()
    with pytest.raises(HostFailed, match=r"took longer than 1 s \(FLUX_DOWNLOAD_TIMEOUT_S\)"):
        fetch(downloader(tmp_path, total_timeout_s=0.6), url)
    assert time.monotonic() - started < 3


def test_http_errors_are_not_retried_and_carry_the_status(file_server: FileServer, tmp_path: Path) -> None:
    dl = downloader(tmp_path, retries=2)
    with pytest.raises(HTTPStatusError, match=r"answered HTTP 404: no such file") as caught:
        fetch(dl, file_server.url + "/missing.bin")
    assert caught.value.status == 404
    assert len(file_server.requests_for("/missing.bin")) == 1


def test_published_sha256_mismatch_is_refused(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/f.bin", payload(100_000))
    dl = downloader(tmp_path)
    with pytest.raises(DownloadError, match="does not match its published SHA-256"):
        fetch(dl, url, expected_sha256="0" * 64)
    assert entries(dl.cache.root) == [] and list((dl.cache.root / "partial").iterdir()) == []
    assert fetch(dl, url, expected_sha256=hashlib.sha256(payload(100_000)).hexdigest()).size == 100_000


def test_finish_hook_can_refuse_a_file(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/pickle.ckpt.bin", PICKLE_BYTES)
    dl = downloader(tmp_path)

    def refuse(path: Path) -> Path:
        raise UserError(f"extra_lora: {sniff_format(path)} refused")

    with pytest.raises(UserError, match="pickle refused"):
        fetch(dl, url, finish=refuse)
    assert entries(dl.cache.root) == []


# ---------------------------------------------------------------- addresses and credentials


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_public_address_rule(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_private_addresses_are_refused_unless_allowed(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = file_server.add("/f.bin", payload(1000))
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS")
    strict = Downloader(FileCache(tmp_path / "cache", max_bytes=0), DownloadSettings.from_env())
    with pytest.raises(
        UserError,
        match=r"refusing to download from 127.0.0.1: it is not a public internet address.*FLUX_ALLOW_PRIVATE_URLS=1",
    ) as caught:
        strict.fetch(url, key="k", input_name="extra_lora", max_size=10**6)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert file_server.requests == []  # refused before a byte was sent

    monkeypatch.setenv("FLUX_ALLOW_PRIVATE_URLS", "1")
    allowed = Downloader(FileCache(tmp_path / "cache", max_bytes=0), DownloadSettings.from_env())
    assert allowed.fetch(url, key="k", input_name="extra_lora", max_size=10**6).size == 1000


def test_private_address_refused_for_host_names_too(tmp_path: Path, file_server: FileServer) -> None:
    storage = FileServer("localhost")
    try:
        url = storage.add("/f.bin", payload(1000))
        with pytest.raises(DownloadError, match=r"refusing to download from localhost: it is not a public"):
            fetch(downloader(tmp_path, allow_private=False), url)
    finally:
        storage.close()


def test_credentials_stay_on_their_host_after_redirects(
    file_server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = FileServer("localhost")  # another host name, as a signed storage URL would be
    try:
        data = payload(300_000)
        signed = storage.add("/blob", data) + "?X-Amz-Signature=topsecretsignature"
        api = file_server.redirect("/api/download/1", signed, status=307)
        same_host = file_server.add("/same.bin", data)
        hop = file_server.redirect("/hop", same_host)
        secret = {"Authorization": "Bearer s3cr3t-token"}
        dl = downloader(tmp_path)
        install_redaction()  # as setup does
        with caplog.at_level(logging.DEBUG):
            assert fetch(dl, api, key="a", auth_headers=secret).path.read_bytes() == data
            assert fetch(dl, hop, key="b", auth_headers=secret).path.read_bytes() == data

        assert file_server.requests_for("/api/download/1")[0].headers["authorization"] == "Bearer s3cr3t-token"
        assert storage.requests and all("authorization" not in r.headers for r in storage.requests)
        same = file_server.requests_for("/same.bin")
        assert len(same) > 1 and all(r.headers.get("authorization") == "Bearer s3cr3t-token" for r in same)
        assert "s3cr3t-token" not in caplog.text and "topsecretsignature" not in caplog.text
        assert "X-Amz-Signature" not in caplog.text  # urllib3's DEBUG request lines are redacted too
    finally:
        storage.close()


def test_errors_never_show_tokens_or_signed_queries(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.url + "/missing.bin?token=query-secret"
    with pytest.raises(DownloadError) as caught:
        fetch(downloader(tmp_path), url, auth_headers={"Authorization": "Bearer header-secret"})
    text = str(caught.value)
    assert "query-secret" not in text and "header-secret" not in text and "missing.bin?..." in text


SIGNED_GET = """
import logging, sys
import requests
{prelude}
logging.getLogger("urllib3").setLevel(logging.DEBUG)
requests.get(sys.argv[1], timeout=30).raise_for_status()
"""


def fresh_process_log(prelude: str, url: str) -> str:
    """What a new Python process logs when it runs `prelude` and then GETs `url` with urllib3 at DEBUG."""
    done = subprocess.run(
        [sys.executable, "-c", SIGNED_GET.format(prelude=prelude), url],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_setup_keeps_signed_queries_out_of_the_http_libraries_logs(file_server: FileServer) -> None:
    """Redaction is installed by setup's explicit call, in a process where nothing imported it before."""
    url = file_server.add("/signed.bin", b"x") + "?X-Amz-Signature=topsecretsignature"
    imported_only = fresh_process_log(
        "import lora.download.downloader\nlogging.basicConfig(level=logging.DEBUG, stream=sys.stdout)", url
    )
    assert "topsecretsignature" in imported_only  # importing changes no logger: the control case
    after_setup = fresh_process_log("from predict import Predictor\nPredictor().setup()", url)
    assert '"GET /signed.bin?... HTTP/1.1" 200' in after_setup and "topsecretsignature" not in after_setup


def test_redact_url() -> None:
    assert (
        redact_url("https://u:p@Example.com:8443/a/b.safetensors?sig=1#frag")
        == "https://example.com:8443/a/b.safetensors?..."
    )
    assert redact_url("http://h/x") == "http://h/x"
    assert redact_url("https://u:p@[::1]:8443/x?q") == "https://[::1]:8443/x?..."


def test_only_http_urls(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="only http"):
        fetch(downloader(tmp_path), "file:///etc/passwd")


# ---------------------------------------------------------------- concurrency and crashes

CHILD = """
import sys
from pathlib import Path
from lora.download.cache import FileCache
from lora.download.config import DownloadSettings
from lora.download.downloader import Downloader
cache = FileCache(Path(sys.argv[1]), max_bytes=0)
settings = DownloadSettings(allow_private=True, retries=0, connections=int(sys.argv[4]), probe_bytes=65536)
result = Downloader(cache, settings).fetch(sys.argv[2], key=sys.argv[3], input_name="test", max_size=10**9)
print("hit" if result.cache_hit else "miss", flush=True)
"""


def child(cache_root: Path, url: str, key: str = "k", connections: int = 4) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_root), url, key, str(connections)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_threads_download_once(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = file_server.add("/once.bin", data, delay=0.4)
    dl = downloader(tmp_path)
    results = []

    def worker() -> None:
        results.append(fetch(dl, url))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(file_server.requests_for("/once.bin")) == 1
    assert sorted(r.cache_hit for r in results) == [False, True, True, True]
    assert {r.path for r in results} == {results[0].path} and results[0].path.read_bytes() == data


def test_concurrent_processes_download_once(file_server: FileServer, tmp_path: Path) -> None:
    data = payload(50_000)
    url = file_server.add("/once.bin", data, delay=1.0)
    cache_root = tmp_path / "cache"
    processes = [child(cache_root, url) for _ in range(3)]
    outputs = [process.communicate(timeout=30) for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert sorted(out.strip() for out, _ in outputs) == ["hit", "hit", "miss"]
    assert len(file_server.requests_for("/once.bin")) == 1


@pytest.mark.parametrize("ranges", [True, False])
def test_kill_9_mid_download_leaves_nothing_that_is_used(file_server: FileServer, tmp_path: Path, ranges: bool) -> None:
    data = payload(2_000_000)
    url = file_server.add("/big.bin", data, ranges=ranges, rate=500_000)
    cache_root = tmp_path / "cache"
    process = child(cache_root, url, connections=2)
    deadline = time.monotonic() + 20

    def in_progress() -> bool:
        if ranges:  # wait until the child has recorded some finished chunks
            return any(len(p.read_text().splitlines()) >= 2 for p in cache_root.glob("partial/*/resume.done"))
        return file_server.bytes_sent.get("/big.bin", 0) >= 300_000

    while not in_progress():
        assert time.monotonic() < deadline and process.poll() is None, "the download did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    cache = FileCache(cache_root, max_bytes=0)
    assert entries(cache_root) == [] and not is_cached(cache, "k")
    file_server.files["/big.bin"].rate = None
    sent_before = file_server.bytes_sent["/big.bin"]
    result = Downloader(cache, settings()).fetch(url, key="k", input_name="t", max_size=10**8)
    assert result.path.read_bytes() == data and not result.cache_hit
    if ranges:  # the finished chunks were kept and reused
        assert file_server.bytes_sent["/big.bin"] - sent_before < len(data)


# ---------------------------------------------------------------- cache: damage and eviction


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_entry_is_fetched_again(
    file_server: FileServer, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(200_000)
    url = file_server.add("/f.bin", data)
    dl = downloader(tmp_path)
    path = fetch(dl, url).path
    requests_before = len(file_server.requests_for("/f.bin"))
    time.sleep(0.05)  # damage comes later than the download (and file times are only so fine)
    with path.open("r+b") as file:
        if damage == "truncate":
            file.truncate(150_000)
        else:
            file.seek(100_000)
            file.write(b"\x00" if data[100_000] else b"\x01")
    with caplog.at_level(logging.WARNING):
        again = fetch(dl, url)
    assert not again.cache_hit and again.path.read_bytes() == data
    assert len(file_server.requests_for("/f.bin")) > requests_before
    assert "fetching it again" in caplog.text


def test_lru_eviction_under_the_size_cap(file_server: FileServer, tmp_path: Path) -> None:
    size = 100_000
    urls = {name: file_server.add(f"/{name}", payload(size, seed=i)) for i, name in enumerate("abc")}
    cache = FileCache(tmp_path / "cache", max_bytes=int(2.5 * size))
    dl = downloader(tmp_path, cache=cache)
    fetch(dl, urls["a"], key="a")
    time.sleep(0.01)
    fetch(dl, urls["b"], key="b")
    time.sleep(0.01)
    assert fetch(dl, urls["a"], key="a").cache_hit  # a is now the most recently used
    time.sleep(0.01)
    fetch(dl, urls["c"], key="c")
    assert not is_cached(cache, "b")
    assert is_cached(cache, "a") and is_cached(cache, "c")


def test_free_disk_floor_evicts_and_refuses(file_server: FileServer, tmp_path: Path) -> None:
    size = 100_000
    root = tmp_path / "cache"
    disk_capacity = 400_000  # a pretend disk holding only the cache

    def free_bytes(_root: Path) -> int:
        used = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return disk_capacity - used

    cache = FileCache(root, max_bytes=0, min_free_bytes=150_000, free_bytes=free_bytes)
    dl = downloader(tmp_path, cache=cache)
    urls = [file_server.add(f"/{i}", payload(size, seed=i)) for i in range(3)]
    fetch(dl, urls[0], key="0")
    fetch(dl, urls[1], key="1")
    fetch(dl, urls[2], key="2")  # 250 kB would be free before, 150 kB after: "0" goes
    assert not is_cached(cache, "0") and is_cached(cache, "1") and is_cached(cache, "2")

    huge = file_server.add("/huge", payload(300_000))
    with pytest.raises(DownloadError, match="not enough room") as caught:
        fetch(dl, huge, key="huge")
    assert str(root) not in str(caught.value) and not isinstance(caught.value, (UserError, UpstreamError))


@pytest.mark.parametrize("ranges", [True, False])
def test_a_full_disk_while_writing_is_one_clear_error_without_the_path(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranges: bool
) -> None:
    url = file_server.add("/f.bin", payload(300_000), ranges=ranges)
    root = tmp_path / "cache"

    def no_room(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "partial" / "x"))

    if ranges:
        monkeypatch.setattr(os, "pwrite", no_room)
    else:
        real_open = Path.open

        class NoRoom(io.BytesIO):
            write = no_room  # type: ignore[assignment]

        def open_without_room(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
            if self.name == "download.part" and mode == "wb":
                return NoRoom()
            return real_open(self, mode, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "open", open_without_room)
    with pytest.raises(DownloadError, match="the server's disk is full") as caught:
        fetch(downloader(tmp_path, cache=FileCache(root, max_bytes=0)), url)
    assert type(caught.value) is DownloadError and str(tmp_path) not in str(caught.value)
    assert not list((root / "partial").iterdir())  # nothing half-written stays


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EACCES])
def test_other_write_failures_hide_the_servers_path(tmp_path: Path, code: int) -> None:
    def produce(_work_dir: Path) -> Path:
        raise OSError(code, os.strerror(code), "/srv/private/cache/partial/x")

    with pytest.raises(DownloadError) as caught:
        downloader(tmp_path).store("k", produce, input_name="extra_lora", description="x.tar")
    assert type(caught.value) is DownloadError and "/srv/private" not in str(caught.value)
    assert ("disk is full" in str(caught.value)) == (code == errno.EDQUOT)


def test_a_file_larger_than_the_whole_cache_is_refused(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/f.bin", payload(300_000))
    dl = downloader(tmp_path, cache=FileCache(tmp_path / "cache", max_bytes=200_000))
    with pytest.raises(DownloadError, match="more than the whole cache may hold") as caught:
        fetch(dl, url)
    assert isinstance(caught.value, UserError)  # it would never fit: the input's fault, unlike a full cache
    with pytest.raises(LargerThanCache):
        dl.cache.make_room(200_001)


@pytest.mark.parametrize("keep", [True, False])
def test_a_failed_producer_leaves_its_work_only_when_it_keeps_it_for_resume(tmp_path: Path, keep: bool) -> None:
    cache = FileCache(tmp_path / "cache", max_bytes=0)

    def fail(work: Work) -> Path:
        (work.dir / "half.part").write_bytes(b"half")
        if keep:
            work.keep_for_resume()
        raise HostFailed("extra_lora: the host went away")

    with pytest.raises(HostFailed):
        cache.get_or_create("k", fail, description="x")
    found: list[bool] = []

    def finish(work: Work) -> Path:
        found.append((work.dir / "half.part").exists())
        (work.dir / "half.part").write_bytes(b"whole")
        return work.dir / "half.part"

    path, hit = cache.get_or_create("k", finish, description="x")
    assert found == [keep] and not hit and path.read_bytes() == b"whole"


def test_cache_persists_across_instances(file_server: FileServer, tmp_path: Path) -> None:
    url = file_server.add("/f.bin", payload(10_000))
    fetch(downloader(tmp_path), url)
    assert fetch(downloader(tmp_path), url).cache_hit


def test_an_intact_entry_that_was_touched_is_hashed_once_and_kept(
    file_server: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = file_server.add("/f.bin", payload(10_000))
    dl = downloader(tmp_path)
    path = fetch(dl, url).path
    os.utime(path, ns=(1, 1))  # e.g. restored from a backup: other times, same bytes
    with caplog.at_level(logging.WARNING):
        assert fetch(dl, url).cache_hit and fetch(dl, url).cache_hit
    assert "fetching it again" not in caplog.text
    meta = json.loads((path.parent / "meta.json").read_text())
    assert meta["fingerprint"][1] == 1


def test_configuration_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLUX_DOWNLOAD_CONNECTIONS", "6")
    monkeypatch.setenv("FLUX_DOWNLOAD_STALL_TIMEOUT_S", "7.5")
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("FLUX_LORA_CACHE_MAX_GB", "0.5")
    monkeypatch.setenv("FLUX_CACHE_MIN_FREE_GB", "1")
    loaded = DownloadSettings.from_env()
    assert (loaded.connections, loaded.stall_timeout_s) == (6, 7.5)
    cache = lora_downloader().cache
    assert (cache.root, cache.max_bytes, cache.min_free_bytes) == (tmp_path / "c", 500_000_000, 1_000_000_000)
    monkeypatch.setenv("FLUX_DOWNLOAD_CONNECTIONS", "many")
    with pytest.raises(ValueError, match="FLUX_DOWNLOAD_CONNECTIONS must be a number"):
        DownloadSettings.from_env()


def test_the_downloaders_defaults_are_the_declared_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = [name for name in SETTINGS if name.startswith("FLUX_DOWNLOAD_")]
    for name in [*downloads, "FLUX_ALLOW_PRIVATE_URLS", *TRUSTED_BASE_URL_SETTINGS]:
        monkeypatch.delenv(name, raising=False)
    assert DownloadSettings() == DownloadSettings.from_env()
    assert DownloadSettings().max_chunk_bytes == int(SETTINGS["FLUX_DOWNLOAD_CHUNK_MB"].default) * MiB


def test_get_json(file_server: FileServer, tmp_path: Path) -> None:
    file_server.route("/api/x", lambda _r: Reply(200, {"Content-Type": "application/json"}, b'{"ok": [1, 2]}'))
    dl = downloader(tmp_path)
    assert dl.get_json(file_server.url + "/api/x", input_name="extra_lora") == {"ok": [1, 2]}
    assert "gzip" in file_server.requests[-1].headers["accept-encoding"]  # so the answer came compressed
    with pytest.raises(HTTPStatusError) as caught:
        dl.get_json(file_server.url + "/api/none", input_name="extra_lora")
    assert caught.value.status == 404


# ---------------------------------------------------------------- file checks


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def tar_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "weights.tar"
    path.write_bytes(content)
    return path


def test_tar_with_exactly_one_safetensors_is_extracted(tmp_path: Path) -> None:
    lora = make_safetensors()
    tar = make_tar({"output/flux_train_replicate/lora.safetensors": lora, "output/config.yaml": b"rank: 16"})
    dest = extract_single_safetensors(
        tar_file(tmp_path, tar), tmp_path / "out.safetensors", input_name="replicate_weights", max_bytes=10**6
    )
    assert dest.read_bytes() == lora


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        ({"../evil.safetensors": b"x"}, [], "unsafe entry name '../evil.safetensors'"),
        ({"a/../../evil.safetensors": b"x"}, [], "unsafe entry name"),
        ({"/etc/evil.safetensors": b"x"}, [], "unsafe entry name '/etc/evil.safetensors'"),
        ({"lora.safetensors": b"x"}, [special("link.safetensors", tarfile.SYMTYPE, "/etc/passwd")], "link"),
        ({"lora.safetensors": b"x"}, [special("hard", tarfile.LNKTYPE, "lora.safetensors")], "link"),
        ({"lora.safetensors": b"x"}, [special("dev", tarfile.CHRTYPE)], "special entry"),
        ({"lora.safetensors": b"x"}, [special("pipe", tarfile.FIFOTYPE)], "special entry"),
        (
            {"a.safetensors": b"x", "b/b.safetensors": b"y"},
            [],
            r"holds 2 .safetensors files \(a.safetensors, b/b.safetensors\)",
        ),
        ({"model.ckpt": b"x", "README": b"y"}, [], r"holds no .safetensors file \(found model.ckpt: pickle"),
    ],
)
def test_bad_tars_are_refused(
    tmp_path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo], message: str
) -> None:
    path = tar_file(tmp_path, make_tar(files, extra))
    with pytest.raises(UserError, match=message) as caught:
        extract_single_safetensors(path, tmp_path / "out.safetensors", input_name="replicate_weights", max_bytes=10**6)
    assert str(caught.value).startswith("replicate_weights: ")
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path.parent / "evil.safetensors").exists()


def test_truncated_and_compressed_tars_are_refused(tmp_path: Path) -> None:
    tar = make_tar({"lora.safetensors": make_safetensors()})
    with pytest.raises(UserError, match="truncated|damaged"):
        extract_single_safetensors(tar_file(tmp_path, tar[:1200]), tmp_path / "o", input_name="x", max_bytes=10**6)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("lora.safetensors")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(UserError, match="not a valid uncompressed .tar"):
        extract_single_safetensors(
            tar_file(tmp_path, buffer.getvalue()), tmp_path / "o", input_name="x", max_bytes=10**6
        )


def test_tar_member_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tar_file(tmp_path, make_tar({"lora.safetensors": b"x" * 5000}))
    with pytest.raises(UserError, match="larger than"):
        extract_single_safetensors(path, tmp_path / "o", input_name="x", max_bytes=1000)


def test_safetensors_sniff_and_check(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(make_safetensors())
    assert sniff_format(good) == "safetensors" and check_safetensors(good, input_name="x") == 2
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="incomplete or damaged"):
        check_safetensors(truncated, input_name="x")
    pickle = tmp_path / "p"
    pickle.write_bytes(PICKLE_BYTES)
    zipped = tmp_path / "z"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    tar = tmp_path / "t"
    tar.write_bytes(make_tar({"a": b"b"}))
    assert (sniff_format(pickle), sniff_format(zipped), sniff_format(tar)) == ("pickle", "zip", "tar")
    with pytest.raises(UserError, match="not a .safetensors file"):
        check_safetensors(pickle, input_name="x")


# ---------------------------------------------------------------- whose fault: user or host


def test_a_5xx_is_the_hosts_fault_and_a_404_the_users(file_server: FileServer, tmp_path: Path) -> None:
    file_server.route("/busy.bin", lambda _r: Reply(503, {}, b"busy"))
    dl = downloader(tmp_path, retries=1)
    with pytest.raises(HostFailed, match=r"^extra_lora: could not download .*/busy.bin: .* answered HTTP 503") as host:
        fetch(dl, file_server.url + "/busy.bin")
    assert isinstance(host.value, UpstreamError) and not isinstance(host.value, UserError)
    assert len(file_server.requests_for("/busy.bin")) == 2  # a quick failure is tried once more
    with pytest.raises(HTTPStatusError) as user:
        fetch(dl, file_server.url + "/missing.bin")
    assert isinstance(user.value, UserError) and not isinstance(user.value, UpstreamError)


def test_a_refused_connection_is_the_hosts_fault(tmp_path: Path) -> None:
    port = closed_port()
    with pytest.raises(HostFailed, match=rf"^extra_lora: could not download http://127.0.0.1:{port}/x: the connection"):
        fetch(downloader(tmp_path), f"http://127.0.0.1:{port}/x")


# ---------------------------------------------------------------- the address guard: resolve, check, connect


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def test_open_closed_and_named_loopback_targets_get_one_message_and_no_connection(
    file_server: FileServer, tmp_path: Path
) -> None:
    strict = downloader(tmp_path, allow_private=False)
    targets = {
        "open": file_server.add("/f.bin", payload(1000)),
        "closed": f"http://127.0.0.1:{closed_port()}/f.bin",
        "named": f"http://localhost:{file_server.port}/f.bin",
    }
    messages = {}
    for name, url in targets.items():
        started = time.monotonic()
        with pytest.raises(UserError) as caught:
            fetch(strict, url)
        assert time.monotonic() - started < 2, name  # refused before connecting: no 10 s connect timeout
        messages[name] = str(caught.value).replace("localhost", "127.0.0.1")
    assert len(set(messages.values())) == 1, messages
    assert "refusing to download from 127.0.0.1: it is not a public internet address" in messages["open"]
    assert file_server.requests == []


def test_every_address_of_a_name_is_checked_before_connecting(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = file_server.add("/f.bin", payload(1000))
    real = socket.getaddrinfo

    def public_then_loopback(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host != "mixed.example":
            return real(host, port, *args, **kwargs)
        public = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))
        loopback = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))
        return [public, loopback]

    monkeypatch.setattr(socket, "getaddrinfo", public_then_loopback)
    with pytest.raises(UserError, match="refusing to download from mixed.example"):
        fetch(downloader(tmp_path, allow_private=False), url.replace("127.0.0.1", "mixed.example"))
    assert file_server.requests == []


def test_the_connection_goes_to_the_resolved_address_with_the_real_host_name(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(200_000)
    url = file_server.add("/f.bin", data)
    real = socket.getaddrinfo
    lookups: list[str] = []

    def resolve(host: str, port: int, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        return real("127.0.0.1" if host == "files.example" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    named = url.replace("127.0.0.1", "files.example")
    assert fetch(downloader(tmp_path, connections=2), named).path.read_bytes() == data
    hosts = {r.headers["host"] for r in file_server.requests_for("/f.bin")}
    assert hosts == {f"files.example:{file_server.port}"}
    # one lookup per connection, each checked and then used: nothing is left for a second answer to change
    assert set(lookups) == {"files.example"} and len(lookups) == len({r.client_port for r in file_server.requests})


# ---------------------------------------------------------------- stalls and cancel


def test_a_dripping_host_fails_after_one_stall_timeout_and_is_not_retried(
    file_server: FileServer, tmp_path: Path
) -> None:
    url = file_server.add("/drip.bin", payload(10_000), ranges=False, drip=0.1)
    started = time.monotonic()
    with pytest.raises(DownloadStalled, match=r"drip.bin stalled: less than 16 KiB arrived in 1 s") as caught:
        fetch(downloader(tmp_path, stall_timeout_s=1.0, retries=2), url)
    assert 1.0 <= time.monotonic() - started < 2.0
    assert isinstance(caught.value, UpstreamError) and "FLUX_DOWNLOAD_STALL_TIMEOUT_S" in str(caught.value)
    assert len(file_server.requests_for("/drip.bin")) == 1


class SteppedClock:
    """A monotonic clock that moves only when the test moves it (by binary fractions, so sums are exact)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_retry_that_sets_progress_back_is_not_a_stall_and_stopped_bytes_are() -> None:
    """A retry calls expect() again (single stream: from 0; ranged: from what the resume state kept). Data that
    keeps flowing across it is no stall, however far into the transfer the retry comes; data that stops is one,
    after exactly one stall timeout. The test steps the clock and polls, so a busy machine cannot shift a window."""
    clock, step = SteppedClock(), 1 / 16
    monitor = TransferMonitor(
        input_name="lora_weights", label="x", cancelled=None, stall_timeout_s=1.0, total_timeout_s=60,
        poll_s=3600, clock=clock,  # the side thread never polls during the test: the test does
    )  # fmt: skip
    with monitor:
        monitor.expect(10 * MiB)
        for number in range(40):
            if number == 20:
                monitor.expect(10 * MiB, already=0)  # the retry, 1.25 s (past one stall timeout) in
            monitor.add(64 * KIB)
            clock.now += step
            monitor.poll()
            monitor.check()
        for _ in range(15):  # 15/16 of a stall timeout without a byte: not yet
            clock.now += step
            monitor.poll()
            monitor.check()
        clock.now += step
        monitor.poll()
        with pytest.raises(DownloadStalled, match="less than 16 KiB arrived in 1 s"):
            monitor.check()


def cancel_after(seconds: float) -> tuple[threading.Event, list[float]]:
    """An Event that is set `seconds` from now, and a list that gets the time it was set."""
    event, when = threading.Event(), []

    def fire() -> None:
        when.append(time.monotonic())
        event.set()

    threading.Timer(seconds, fire).start()
    return event, when


@pytest.mark.parametrize("kind", ["single stream", "ranged", "waiting for headers"])
def test_cancel_ends_a_download_within_a_second(file_server: FileServer, tmp_path: Path, kind: str) -> None:
    options = {
        "single stream": {"ranges": False, "drip": 0.5},
        "ranged": {"ranges": True, "rate": 50_000},  # every chunk worker is in a read when the cancel comes
        "waiting for headers": {"delay": 30},
    }[kind]
    url = file_server.add("/slow.bin", payload(2_000_000), **options)
    dl = downloader(tmp_path, connections=4, stall_timeout_s=60)
    cancel, when = cancel_after(0.8)
    with pytest.raises(DownloadCancelled, match=r"^extra_lora: the prediction was canceled while downloading"):
        fetch(dl, url, cancelled=cancel.is_set)
    assert time.monotonic() - when[0] < 1.0
    assert entries(dl.cache.root) == []
    file_server.files["/slow.bin"] = Reply(**{**vars(file_server.files["/slow.bin"]), "drip": None, "rate": None, "delay": 0})
    assert fetch(dl, url).path.read_bytes() == payload(2_000_000)  # the next request for it works


def test_cancel_during_the_retry_pause(file_server: FileServer, tmp_path: Path) -> None:
    file_server.route("/busy.bin", lambda _r: Reply(503, {}, b"busy"))
    dl = downloader(tmp_path, retries=3, retry_backoff_s=20)
    cancel, when = cancel_after(0.5)
    with pytest.raises(DownloadCancelled):
        fetch(dl, file_server.url + "/busy.bin", cancelled=cancel.is_set)
    assert time.monotonic() - when[0] < 1.0


def test_tls_uses_the_real_host_name_for_sni_and_verifies_its_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS server on loopback with a self-signed certificate for files.example (tests/fixtures/files.example.pem,
    made once with openssl): the client connects to the checked address but asks for files.example, and refuses
    a certificate no authority signed."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(REPO_ROOT / "tests" / "fixtures" / "files.example.pem")
    asked_for: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: asked_for.append(name)  # type: ignore[assignment,return-value]
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        connection, _ = listener.accept()
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
            pass  # the client refuses the certificate during the handshake

    threading.Thread(target=serve_one, daemon=True).start()
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1" if host == "files.example" else host, *a, **k)
    )
    try:
        with pytest.raises(HostFailed, match=r"^extra_lora: TLS failed with files.example; its certificate"):
            fetch(downloader(tmp_path), f"https://files.example:{port}/f.bin")
    finally:
        listener.close()
    assert asked_for == ["files.example"]
