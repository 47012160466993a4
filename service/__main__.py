"""Start the inference service: `python -m service [--host H] [--port P] [--checkpoint PATH]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from service.settings import Settings, format_settings_error

logger = logging.getLogger("service")


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
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(format_settings_error(exc), file=sys.stderr)
        return 2

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from service.app import StartupError, create_app, load_predictor

    try:
        predictor = load_predictor(settings.checkpoint)
    except StartupError as exc:
        logger.error("%s", exc)
        return 1

    app = create_app(settings, predictor)
    state = app.state.service

    class DrainingServer(uvicorn.Server):
        """Turns readiness off as soon as SIGTERM or SIGINT arrives, before uvicorn drains."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            logger.info("received signal %d", sig)
            state.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging set up above
        access_log=False,  # the service logs one line per request itself
        timeout_graceful_shutdown=int(max(1, settings.drain_timeout_s)),
    )
    server = DrainingServer(config)
    server.run()
    # uvicorn sets `started` only after the lifespan started; a failed start-up lands here.
    if not server.started:
        logger.error("the service did not start; see the errors above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
