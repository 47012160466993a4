"""Connection-level parts of `python -m service`: sockets, connection timeouts, file limits."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("service")

# Start of the message that asyncio logs, with a traceback, for each failed accept() when the
# process has no file descriptors left (Python 3.11, BaseSelectorEventLoop._accept_connection).
ACCEPT_ERROR_MESSAGE = "socket.accept() out of system resource"
# Seconds between two log lines of a repeated accept() failure.
ACCEPT_ERROR_LOG_INTERVAL_S = 10.0


class ListenError(Exception):
    """The service cannot listen on its address; the message names the address and the fix."""


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind one TCP socket per address of `host` at `port`, without listening yet.

    The options are those of asyncio's `loop.create_server`: SO_REUSEADDR, and IPV6_V6ONLY for
    IPv6 addresses. uvicorn starts listening on the sockets once the app's start-up has ended,
    so connections made before that are refused, as they are without pre-bound sockets.

    Raises:
        ListenError: `host` does not resolve, or an address cannot be bound, for example
            because another process listens on the port.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        message = f"cannot resolve host {host!r} ({exc}): set --host or ADAMTL_HOST"
        raise ListenError(message) from exc

    sockets: list[socket.socket] = []
    try:
        # getaddrinfo may list the same address once per protocol; bind each once.
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise ListenError(_bind_failure(host, port, exc)) from exc
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _bind_failure(host: str, port: int, error: OSError) -> str:
    where = f"cannot listen on {host}:{port} ({error.strerror or error})"
    if error.errno == errno.EADDRINUSE:
        return (
            f"{where}: another process uses the port. Stop it, or choose another port with "
            "--port or ADAMTL_PORT"
        )
    if error.errno == errno.EACCES:
        return f"{where}: ports below 1024 need privileges. Choose another port with --port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{where}: no network interface has this address. Check --host or ADAMTL_HOST"
    return f"{where}: check --host and --port (ADAMTL_HOST, ADAMTL_PORT)"


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time.

    uvicorn 0.55 arms its keep-alive timer only after a response, and each received chunk
    cancels it. So a connection that never sends anything, or sends its request line and
    headers a byte at a time, stays open and keeps its file descriptor for ever. This protocol
    also runs a deadline of `header_timeout_s` seconds from the moment the connection opens,
    and again from the end of each response. Received data does not reset it. It stops once
    h11 has parsed a whole request line and headers. From then on the app's own timeouts
    apply, such as ADAMTL_UPLOAD_TIMEOUT_S for the body of /predict.

    Use `with_header_timeout` to get a subclass with the timeout set.
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_header_timeout(cls, timeout_s: float) -> type[HeaderTimeoutProtocol]:
        """Return a subclass, for uvicorn's `http` option, whose deadline is `timeout_s`."""
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s}")
        return type(cls.__name__, (cls,), {"header_timeout_s": timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        # uvicorn starts a new request-response cycle once h11 has parsed a request head.
        if self.cycle is not cycle:
            self._stop_header_timer()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._stop_header_timer()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        # Started before uvicorn's handler, which parses a pipelined request head at once.
        self._start_header_timer()
        super().on_response_complete()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            # uvicorn's connection_lost then updates the h11 and request state.
            self.transport.close()


class RepeatedMessageFilter(logging.Filter):
    """Pass one record per `interval_s` whose message starts with `prefix`, and count the rest.

    A record that passes ends with the number dropped since the previous one. Other records pass
    unchanged. Attach the filter to the logger that emits the repeated message.
    """

    def __init__(
        self, prefix: str, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval_s = interval_s
        self._clock = clock
        self._next_pass_at = -math.inf
        self._dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.prefix):
            return True
        now = self._clock()
        with self._lock:
            if now < self._next_pass_at:
                self._dropped += 1
                return False
            dropped, self._dropped = self._dropped, 0
            self._next_pass_at = now + self.interval_s
        if dropped:
            # No % signs are added, so formatting with the record's arguments still works.
            record.msg = (
                f"{record.msg}\n({dropped} more like this in the last {self.interval_s:g} s "
                "were not logged)"
            )
        return True


def raise_open_file_limit() -> None:
    """Raise the soft limit of open files (RLIMIT_NOFILE) to the hard limit, and log the result.

    Every connection uses a file descriptor. Many systems start processes with a soft limit of
    1024 and a much higher hard limit, which an unprivileged process may raise the soft one to.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        logger.info("open-file limit (RLIMIT_NOFILE): %d", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        # The kernel may reject the value, for example an unlimited hard limit.
        logger.warning(
            "open-file limit (RLIMIT_NOFILE) stays at %d, since raising it to the hard limit %s "
            "failed (%s)",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            exc,
        )
        return
    logger.info("open-file limit (RLIMIT_NOFILE) raised from %d to the hard limit %d", soft, hard)
