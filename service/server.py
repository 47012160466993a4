"""Connection-level parts of `python -m service`: the listening sockets."""

from __future__ import annotations

import errno
import socket


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
