"""One JSON error body for every failure: the service's own, FastAPI's and Starlette's."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorResponse

logger = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


# Longest client value, in characters of its repr, that messages and logs repeat.
MAX_ECHOED_CHARS = 80


def shorten(value: object) -> str:
    """Return repr(value), cut to MAX_ECHOED_CHARS so that huge inputs do not flood responses."""
    text = repr(value)
    if len(text) <= MAX_ECHOED_CHARS:
        return text
    return f"{text[: MAX_ECHOED_CHARS - 3]}... ({len(text)} characters)"


class ServiceError(Exception):
    """A failure to report to the client with `status_code` and a message.

    Args:
        status_code: HTTP status of the response.
        error_type: Stable snake_case kind, e.g. `queue_full`.
        message: What failed, on which value, and what to do next.
        headers: Extra response headers, e.g. Retry-After.
    """

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    request: Request,
    status_code: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build the JSON error response and remember its kind for the request log."""
    request_id = getattr(request.state, "request_id", None)
    request.state.error = f"{error_type}: {message}"
    body = ErrorResponse(code=status_code, type=error_type, message=message, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for item in errors:
        location = [str(part) for part in item.get("loc", ())]
        if len(location) >= 2:
            where = f"{location[0]} parameter {'.'.join(location[1:])!r}"
        else:
            where = " ".join(location) or "request"
        value = item.get("input")
        quoted_input = f" (got {shorten(value)})" if isinstance(value, str | int | float) else ""
        parts.append(f"{where}: {item.get('msg', 'invalid value')}{quoted_input}")
    return "; ".join(parts) + ". See /docs for the valid parameters."


async def _handle_service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc.status_code, exc.error_type, exc.message, exc.headers)


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message = _describe_validation_errors(exc.errors())
    return error_response(request, 422, "invalid_parameter", message)


async def _handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route for {request.url.path!r}: see /docs for the endpoints"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path!r}: see /docs"
    return error_response(request, exc.status_code, error_type, message, exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error raised by handlers and by FastAPI through one body shape."""
    app.add_exception_handler(ServiceError, _handle_service_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_error)
