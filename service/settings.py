"""Service settings, read from `ADAMTL_`-prefixed environment variables."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.memory import MIN_INTERVAL_S

DEFAULT_CHECKPOINT = Path("checkpoints/demo.safetensors")
MAX_TRIM_INTERVAL_S = 86_400  # one day
ENV_PREFIX = "ADAMTL_"


class Settings(BaseSettings):
    """Every tunable of the inference service.

    Each field is read from the environment variable `ADAMTL_<FIELD NAME IN CAPITALS>`, for
    example `ADAMTL_MAX_BATCH_SIZE=16`. Command-line flags of `python -m service` override them.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # Model.
    checkpoint: Path = Field(
        DEFAULT_CHECKPOINT, description="Path of the .safetensors checkpoint to serve."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Maximum intra-op threads of torch in the inference thread, at most the "
        "CPUs the process may use. A batch gets "
        "the CPUs that busy image threads leave, at least 1. Unset keeps the count of the "
        "thread that starts the service (torch's default in a new process).",
    )
    warmup: bool = Field(True, description="Run one batch through the model before turning ready.")
    image_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Threads that decode uploads and encode output PNGs; unset uses one per CPU "
        "this process may use.",
    )
    image_thread_niceness: int = Field(
        5,
        ge=0,
        le=19,
        description="Nice value added to the threads that decode uploads and resize and encode "
        "maps, so that under load the inference thread, which every request waits for, gets a "
        "core first. 0 leaves them at the process's priority. Linux only.",
    )

    reuse_freed_memory: bool = Field(
        True,
        description="Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of "
        "unmapping them, which saves the page faults of fresh memory on every request "
        "(model_core.allocator). A threshold that the environment sets keeps its value.",
    )
    malloc_trim_interval_s: float = Field(
        10.0,
        le=MAX_TRIM_INTERVAL_S,
        allow_inf_nan=False,
        description="Seconds between calls of glibc's malloc_trim, which returns freed heap "
        "pages to the system. 0 turns it off, and other values must be at least "
        f"{MIN_INTERVAL_S:g}.",
    )

    # HTTP server.
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the service's log lines."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds a connection may take to send a whole request line and headers, "
        "counted from when it opens and from the end of each response, before it is closed.",
    )
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds to finish queued requests after SIGTERM.",
    )

    # Micro-batching.
    max_batch_size: int = Field(8, ge=1, le=256, description="Images per forward pass, at most.")
    # 0 starts a batch as soon as the inference thread is free, as Triton's dynamic batcher
    # does by default. Requests that arrive meanwhile still form the next batch.
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        allow_inf_nan=False,
        description="Milliseconds a batch waits to fill after its first image.",
    )
    max_queue_size: int = Field(
        64, ge=1, le=100_000, description="Requests admitted (queued or running) before 503."
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds from the end of the upload until a request fails with 504; "
        "decoding, the queue, inference and encoding the maps all count.",
    )

    # Input limits.
    upload_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Seconds a client may take to send the request body before 408.",
    )
    max_upload_bytes: int = Field(
        20_000_000, ge=1, description="Largest accepted image upload in bytes (20 MB)."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted image area in pixels (40 megapixels)."
    )
    max_pixels_in_flight: int = Field(
        200_000_000,
        ge=1,
        description="Decoded pixels that the prediction requests in flight may hold together "
        "before 503 (200 megapixels); a JPEG counts at its reduced decoding scale.",
    )

    @field_validator("malloc_trim_interval_s")
    @classmethod
    def _check_trim_interval(cls, value: float) -> float:
        if value != 0 and value < MIN_INTERVAL_S:
            raise ValueError(
                f"must be 0 (trimming off) or at least {MIN_INTERVAL_S:g} s, because shorter "
                "intervals keep a thread in malloc_trim most of the time"
            )
        return value

    @model_validator(mode="after")
    def _check_pixels_in_flight(self) -> Settings:
        # Otherwise an image within max_image_pixels could never be admitted.
        if self.max_pixels_in_flight < self.max_image_pixels:
            raise ValueError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) is smaller than "
                f"max_image_pixels ({self.max_image_pixels}): set ADAMTL_MAX_PIXELS_IN_FLIGHT "
                "to at least ADAMTL_MAX_IMAGE_PIXELS"
            )
        return self

    @model_validator(mode="after")
    def _check_admission_covers_batch(self) -> Settings:
        # A queue smaller than a batch could never fill one, so batching would be capped below
        # max_batch_size without anyone noticing.
        if self.max_queue_size < self.max_batch_size:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) is smaller than max_batch_size "
                f"({self.max_batch_size}): set ADAMTL_MAX_QUEUE_SIZE to at least the batch size"
            )
        return self


def missing_checkpoint_message(checkpoint: Path) -> str:
    """Explain that `checkpoint` does not exist and how to get one."""
    return (
        f"checkpoint not found: {checkpoint} (resolved to {checkpoint.resolve()}). Create it by "
        "training the demo model (training/run_all.sh --preset demo), or pass --checkpoint PATH "
        "(or set ADAMTL_CHECKPOINT) to an existing .safetensors checkpoint."
    )


# pydantic's error types for a value of the wrong kind or out of range. Their messages name
# the expected kind or one bound, so the message gets the whole accepted range added.
_VALUE_ERRORS = frozenset(
    {
        "bool_parsing",
        "bool_type",
        "int_parsing",
        "int_type",
        "int_from_float",
        "float_parsing",
        "float_type",
        "finite_number",
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
    }
)


_BOUND_WORDS = (("ge", "at least"), ("gt", "above"), ("le", "at most"), ("lt", "below"))

# Bounds that another setting sets (the model validators of Settings).
_RELATED_BOUNDS = {
    "max_batch_size": "at most ADAMTL_MAX_QUEUE_SIZE",
    "max_queue_size": "at least ADAMTL_MAX_BATCH_SIZE",
    "max_image_pixels": "at most ADAMTL_MAX_PIXELS_IN_FLIGHT",
    "max_pixels_in_flight": "at least ADAMTL_MAX_IMAGE_PIXELS",
}


def _accepted_values(field: str) -> str | None:
    """Describe the values a numeric or boolean setting accepts, e.g. "an integer from 0 to 19"."""
    if field == "malloc_trim_interval_s":
        # Its validator also rejects values between 0 and MIN_INTERVAL_S.
        interval = f"{MIN_INTERVAL_S:g} to {MAX_TRIM_INTERVAL_S:g}"
        return f"0 to turn trimming off, or a number from {interval}"
    info = Settings.model_fields.get(field)
    if info is None:
        return None

    kinds = set(get_args(info.annotation)) or {info.annotation}
    optional = type(None) in kinds
    kinds.discard(type(None))
    if kinds == {bool}:
        return "true or false"
    if kinds == {int}:
        kind = "an integer"
    elif kinds == {float}:
        kind = "a number"
    else:
        return None

    bounds = {}
    for constraint in info.metadata:
        for name, _ in _BOUND_WORDS:
            value = getattr(constraint, name, None)
            if value is not None:
                bounds[name] = value
    if "ge" in bounds and "le" in bounds:
        text = f"{kind} from {bounds['ge']:g} to {bounds['le']:g}"
    else:
        limits = [f"{words} {bounds[name]:g}" for name, words in _BOUND_WORDS if name in bounds]
        text = f"{kind} {' and '.join(limits)}" if limits else kind

    if field in _RELATED_BOUNDS:
        text = f"{text}, and {_RELATED_BOUNDS[field]}"
    return f"{text}, or leave it unset" if optional else text


def format_settings_error(error: ValidationError, flags: Collection[str] = ()) -> str:
    """Turn a settings validation error into one line per invalid variable.

    `flags` names the fields given as command-line flags (`--port` for `port`), which the
    lines then name instead of the environment variable.
    """
    lines = ["invalid service settings:"]
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        # pydantic prefixes the messages of ValueErrors raised by validators.
        message = item["msg"].removeprefix("Value error, ")
        if field:
            name = f"{ENV_PREFIX}{field.upper()}"
            if field in flags:
                name = "--" + field.replace("_", "-")
            accepted = _accepted_values(field) if item["type"] in _VALUE_ERRORS else None
            hint = f"; use {accepted}" if accepted else ""
            lines.append(f"  {name}={item.get('input')!r}: {message}{hint}")
        else:
            lines.append(f"  {message}")
    return "\n".join(lines)


def unknown_setting_variables(environ: Mapping[str, str]) -> list[str]:
    """Return one message per `ADAMTL_` variable in `environ` that names no setting.

    pydantic-settings ignores such variables, so a misspelled name would leave its setting at
    the default without any sign.
    """
    valid = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields]
    messages = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in valid:
            continue
        close = difflib.get_close_matches(name.upper(), valid, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        messages.append(f"  {name}: unknown setting; {hint}docs/service.md lists the settings")
    return messages
