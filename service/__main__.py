"""Start the inference service: `python -m service [--host H] [--port P] [--checkpoint PATH]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from service.server import (
    ACCEPT_ERROR_LOG_INTERVAL_S,
    ACCEPT_ERROR_MESSAGE,
    HeaderTimeoutProtocol,
    ListenError,
    RepeatedMessageFilter,
    bind_sockets,
    raise_open_file_limit,
)
from service.settings import Settings, format_settings_error, unknown_setting_variables

logger = logging.getLogger("service")

# Seconds uvicorn waits after the drain for open connections to finish sending responses.
FLUSH_TIMEOUT_S = 3
# A SIGTERM this soon after the first one is the same request delivered twice, not a second
# request to stop at once: `kill -TERM -- -PGID` on `make serve` reaches the service directly
# and through make, which passes it on to its children.
REPEATED_SIGTERM_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description=(
            "Serve an AdaMTL checkpoint over HTTP. Every setting can also be given as an "
            "ADAMTL_-prefixed environment variable (see docs/service.md); flags win."
        ),
    )
    parser.add_argument("--host", help="address to listen on (ADAMTL_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (ADAMTL_PORT, default 8000)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint to serve (ADAMTL_CHECKPOINT, default checkpoints/demo.safetensors)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="level of log lines (ADAMTL_LOG_LEVEL, default info)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key in Settings.model_fields
    }
    unknown = unknown_setting_variables(os.environ)
    if unknown:
        print("\n".join(["invalid service settings:", *unknown]), file=sys.stderr)
        return 2
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(format_settings_error(exc, flags=overrides), file=sys.stderr)
        return 2

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Debug level is for the service's own lines. Pillow logs every PNG chunk it reads and
    # asyncio its event loop at debug level, which would bury them.
    for library in ("PIL", "asyncio"):
        logging.getLogger(library).setLevel(max(logging.INFO, logging.getLogger().level))
    # Without file descriptors left, asyncio logs each failed accept() with a traceback, which
    # came to about 9,000 lines a second with Python 3.11 on 2 cores. One per interval passes.
    logging.getLogger("asyncio").addFilter(
        RepeatedMessageFilter(ACCEPT_ERROR_MESSAGE, ACCEPT_ERROR_LOG_INTERVAL_S)
    )
    raise_open_file_limit()
    import uvicorn

    from model_core.threads import use_torch_threads
    from service.app import StartupError, create_app, load_predictor

    if settings.torch_threads is None:
        import torch

        # torch's default, read before this thread's count drops to 1 below.
        settings = settings.model_copy(update={"torch_threads": torch.get_num_threads()})
    # This thread loads the model and then runs the event loop. With one torch thread it
    # starts no OpenMP team next to the inference thread's (model_core.threads).
    use_torch_threads(1)
    try:
        predictor = load_predictor(settings.checkpoint)
    except StartupError as exc:
        logger.error("%s", exc)
        return 1

    # Bound before the app's start-up, so that a port in use fails here with one clear message,
    # before the warm-up and the "ready" log line. uvicorn listens once the start-up has ended.
    try:
        sockets = bind_sockets(settings.host, settings.port)
    except ListenError as exc:
        logger.error("%s", exc)
        return 1

    app = create_app(settings, predictor)
    state = app.state.service

    class DrainingServer(uvicorn.Server):
        """Drain on the first SIGTERM or SIGINT while still listening, then let uvicorn exit.

        uvicorn's own shutdown (0.55, `Server.shutdown`) closes the listening socket at once
        and cancels the requests left after `timeout_graceful_shutdown`, before the app's
        lifespan shutdown runs. So the drain runs first. New connections get the JSON 503
        meanwhile, and requests unfinished at the deadline get a JSON 503 instead of uvicorn's
        plain-text 500.
        """

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._drain_signal: int | None = None
            self._drain_signal_at = 0.0  # time.monotonic() of the first signal
            # Strong references, because the event loop keeps only weak ones to its tasks.
            self._drain_tasks: list[asyncio.Task] = []

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            # uvicorn logs its own "running on" line only for sockets it binds itself.
            for sock in sockets or []:
                host, port = sock.getsockname()[:2]
                if sock.family == socket.AF_INET6:
                    host = f"[{host}]"
                logger.info("listening on http://%s:%d", host, port)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # uvicorn installs this with signal.signal, so it runs on the main thread between
            # two steps of the event loop, or while the loop waits in select().
            # call_soon_threadsafe schedules the drain and also wakes a waiting loop.
            logger.info("received signal %d", sig)
            state.begin_drain()
            if self._loop is None or not self.started or state.batcher is None:
                # Still starting: nothing was served yet, so uvicorn's own shutdown is enough.
                super().handle_exit(sig, frame)
            elif self._drain_signal is None:
                # The time first: a signal that interrupts this handler between the two lines
                # then finds a drain signal with its time.
                self._drain_signal_at = time.monotonic()
                self._drain_signal = sig
                self._loop.call_soon_threadsafe(self._start_drain, settings.drain_timeout_s)
            elif (
                sig == signal.SIGTERM == self._drain_signal
                and time.monotonic() - self._drain_signal_at < REPEATED_SIGTERM_S
            ):
                logger.info(
                    "SIGTERM again within %g s of the first: taken as the same request, so "
                    "the drain goes on",
                    REPEATED_SIGTERM_S,
                )
            elif not self.should_exit:
                logger.info("second signal during the drain: sending 503 to unfinished requests")
                self._loop.call_soon_threadsafe(self._start_drain, 0.0)
                # uvicorn records every signal and forces the exit on a second SIGINT, so the
                # deferred first signal is handed over before this one.
                super().handle_exit(self._drain_signal, frame)
                super().handle_exit(sig, frame)
            else:
                super().handle_exit(sig, frame)

        def _start_drain(self, timeout_s: float) -> None:
            self._drain_tasks.append(asyncio.create_task(self._drain_then_exit(timeout_s)))

        async def _drain_then_exit(self, timeout_s: float) -> None:
            try:
                await state.drain(timeout_s)
            except Exception:
                logger.exception("the drain failed, so the server shuts down without it")
            if not self.should_exit:
                assert self._drain_signal is not None
                super().handle_exit(self._drain_signal, None)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging set up above
        access_log=False,  # the service logs one line per request itself
        http=HeaderTimeoutProtocol.with_header_timeout(settings.header_timeout_s),
        # The drain has already given requests ADAMTL_DRAIN_TIMEOUT_S, so this only flushes.
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
    )
    server = DrainingServer(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        # uvicorn re-raises a captured SIGINT after its shutdown, as uvicorn.run expects.
        pass
    # uvicorn sets `started` only after the lifespan started; a failed start-up lands here.
    if not server.started:
        logger.error("the service did not start; see the errors above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
