"""The downloader's knobs and how they are read from the environment. `settings.py` declares each variable's
default and meaning; the dataclass's defaults are those same declared values, converted as `from_env` does.

The timeouts are chosen so that a bad host cannot hold the server's only prediction slot for minutes: a host
that sends nothing, or drips bytes, fails after one stall timeout and is not retried; only quick failures (5xx,
a dropped connection) are retried; and the overall deadline lets a 3 GB file arrive at 5 MB/s. A cancel ends a
download within a second whatever these are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import settings
from lora.download.redaction import url_origin
from settings import TRUSTED_BASE_URL_SETTINGS
from units import MiB


def _tuned(number: Callable[[str], float]) -> dict[str, float]:
    """The fields that settings.py declares, from `number(name)`: a setting's value or its declared default."""
    return {
        "connections": max(1, int(number("FLUX_DOWNLOAD_CONNECTIONS"))),
        "max_chunk_bytes": max(1, int(number("FLUX_DOWNLOAD_CHUNK_MB") * MiB)),
        "connect_timeout_s": number("FLUX_DOWNLOAD_CONNECT_TIMEOUT_S"),
        "stall_timeout_s": number("FLUX_DOWNLOAD_STALL_TIMEOUT_S"),
        "total_timeout_s": number("FLUX_DOWNLOAD_TIMEOUT_S"),
        "retries": max(0, int(number("FLUX_DOWNLOAD_RETRIES"))),
    }


_DECLARED = _tuned(lambda name: float(settings.SETTINGS[name].default))  # settings.py's defaults, nothing read


@dataclass(frozen=True)
class DownloadSettings:
    connections: int = _DECLARED["connections"]
    max_chunk_bytes: int = _DECLARED["max_chunk_bytes"]
    probe_bytes: int = 1 * MiB
    connect_timeout_s: float = _DECLARED["connect_timeout_s"]
    stall_timeout_s: float = _DECLARED["stall_timeout_s"]
    total_timeout_s: float = _DECLARED["total_timeout_s"]
    retries: int = _DECLARED["retries"]
    retry_backoff_s: float = 0.5
    allow_private: bool = False
    # Origins (scheme, host, port) the operator configured as base URLs: downloads that start there may use
    # private addresses (a self-hosted Hub mirror and its storage), while user-given URLs may not.
    trusted_origins: frozenset[tuple[str, str, int]] = frozenset()
    progress_interval_s: float = 5.0

    @classmethod
    def from_env(cls) -> DownloadSettings:
        return cls(
            **_tuned(settings.number),  # type: ignore[arg-type]
            allow_private=settings.flag("FLUX_ALLOW_PRIVATE_URLS"),
            trusted_origins=frozenset(
                url_origin(settings.text(name)) for name in TRUSTED_BASE_URL_SETTINGS if settings.is_set(name)
            ),
        )
