"""The downloader's knobs, with their defaults and how they are read from the environment (`settings.py` holds
each variable's meaning).

The timeouts are chosen so that a bad host cannot hold the server's only prediction slot for minutes: a host
that sends nothing, or drips bytes, fails after one stall timeout (20 s) and is not retried; only quick
failures (5xx, a dropped connection) are retried, once; and the overall deadline (600 s) lets a 3 GB file
arrive at 5 MB/s. A cancel ends a download within a second whatever these are.
"""

from __future__ import annotations

from dataclasses import dataclass

import settings
from lora.download.redaction import url_origin
from settings import TRUSTED_BASE_URL_SETTINGS

MiB = 1 << 20


@dataclass(frozen=True)
class DownloadSettings:
    connections: int = 8
    max_chunk_bytes: int = 64 * MiB
    probe_bytes: int = 1 * MiB
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 20.0
    total_timeout_s: float = 600.0
    retries: int = 1
    retry_backoff_s: float = 0.5
    allow_private: bool = False
    # Origins (scheme, host, port) the operator configured as base URLs: downloads that start there may use
    # private addresses (a self-hosted Hub mirror and its storage), while user-given URLs may not.
    trusted_origins: frozenset[tuple[str, str, int]] = frozenset()
    progress_interval_s: float = 5.0

    @classmethod
    def from_env(cls) -> DownloadSettings:
        return cls(
            connections=max(1, int(settings.number("FLUX_DOWNLOAD_CONNECTIONS"))),
            max_chunk_bytes=max(1, int(settings.number("FLUX_DOWNLOAD_CHUNK_MB") * MiB)),
            connect_timeout_s=settings.number("FLUX_DOWNLOAD_CONNECT_TIMEOUT_S"),
            stall_timeout_s=settings.number("FLUX_DOWNLOAD_STALL_TIMEOUT_S"),
            total_timeout_s=settings.number("FLUX_DOWNLOAD_TIMEOUT_S"),
            retries=max(0, int(settings.number("FLUX_DOWNLOAD_RETRIES"))),
            allow_private=settings.flag("FLUX_ALLOW_PRIVATE_URLS"),
            trusted_origins=frozenset(
                url_origin(settings.text(name)) for name in TRUSTED_BASE_URL_SETTINGS if settings.is_set(name)
            ),
        )
