"""The address guard: resolve the host, check every address, then connect to a checked one.

A URL from a request must not reach this server's own network (cloud metadata at 169.254.169.254, an admin
port on localhost). So before any packet goes out, every address the name resolves to must be public;
otherwise the connection is refused with one message that does not depend on the target (an open, a closed
and a filtered port look the same, so the guard cannot be used to scan ports). The socket is then connected
to one of those checked addresses, so a second DNS answer (rebinding) cannot change where it goes. urllib3
keeps sending the real host name in the Host header and in TLS (SNI and certificate checks), since only the
socket comes from here. Every redirect hop opens its connections the same way.

The connect waits in slices of 0.2 s so a cancel or the deadline (see `monitor`) ends it early.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import time
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from lora.download.monitor import TransferMonitor

_SLICE_S = 0.2
_DEFAULT_CONNECT_S = 10.0


class PrivateAddressError(Exception):
    """The host resolves to an address the guard refuses. Not an OSError, so urllib3 passes it through."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.host = host


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int, *, allow_private: bool) -> list[tuple[Any, ...]]:
    """getaddrinfo's answers for a TCP connection; PrivateAddressError if any address is not public."""
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not allow_private and not all(is_public_address(str(answer[4][0])) for answer in answers):
        raise PrivateAddressError(host)
    return answers


def connect(answers: list[tuple[Any, ...]], timeout_s: float, monitor: TransferMonitor | None) -> socket.socket:
    """A socket connected to the first of `answers` that accepts, within `timeout_s` in all."""
    deadline = time.monotonic() + timeout_s
    last_error: OSError = OSError(errno.EHOSTUNREACH, "no address to connect to")
    for family, kind, proto, _name, address in answers:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _connect_in_slices(sock, address, deadline, monitor)
            return sock
        except OSError as error:
            sock.close()
            last_error = error
            if isinstance(error, TimeoutError):
                break  # the time is spent
        except BaseException:
            sock.close()
            raise
    raise last_error


def _connect_in_slices(sock: socket.socket, address: Any, deadline: float, monitor: TransferMonitor | None) -> None:
    sock.setblocking(False)
    code = sock.connect_ex(address)
    while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
        if monitor is not None:
            monitor.check()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connect timed out")
        _, writable, _ = select.select([], [sock], [], min(_SLICE_S, left))
        if writable:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code not in (0, errno.EISCONN):
        raise OSError(code, "connect failed")
    sock.setblocking(True)


class _GuardedConnection:
    """urllib3's connection with its socket made by `resolve` + `connect` instead of create_connection."""

    host: str
    port: int
    timeout: Any
    _dns_host: str
    allow_private: bool = False
    monitor: TransferMonitor | None = None

    def _new_conn(self) -> socket.socket:
        if self.monitor is not None:
            self.monitor.register(self)
        try:
            answers = resolve(self._dns_host, self.port, allow_private=self.allow_private)
        except socket.gaierror as error:
            raise NameResolutionError(self.host, self, error) from error  # type: ignore[arg-type]
        connect_timeout_s = float(self.timeout) if isinstance(self.timeout, (int, float)) else _DEFAULT_CONNECT_S
        try:
            sock = connect(answers, connect_timeout_s, self.monitor)
        except TimeoutError as error:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from error
        except OSError as error:
            raise NewConnectionError(self, f"Failed to establish a new connection: {error}") from error  # type: ignore[arg-type]
        sock.settimeout(connect_timeout_s)  # urllib3 sets the read timeout once the request is sent
        return sock


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections go through the guard (and register with `monitor`)."""

    def __init__(self, *, allow_private: bool, monitor: TransferMonitor | None) -> None:
        binding = {"allow_private": allow_private, "monitor": monitor}
        http_conn = type("GuardedHTTPConnection", (_GuardedConnection, HTTPConnection), binding)
        https_conn = type("GuardedHTTPSConnection", (_GuardedConnection, HTTPSConnection), binding)
        self._pool_classes = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes
