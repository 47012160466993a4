"""Response bodies of the HTTP API; they also define the OpenAPI schema at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Body of every error response, including FastAPI's own validation errors."""

    code: int = Field(description="HTTP status code, repeated in the body.", examples=[422])
    type: str = Field(
        description="Stable machine-readable error kind, e.g. `invalid_budget`.",
        examples=["invalid_budget"],
    )
    message: str = Field(
        description="What failed, on which value, and what to do about it.",
        examples=["budget 1.5 is outside the valid range [0.3, 1.0]: pass a value in it"],
    )
    request_id: str | None = Field(None, description="Id of the request, as in X-Request-ID.")


class ModelRef(BaseModel):
    name: str
    version: str


class ImageSize(BaseModel):
    """Size of the uploaded image as displayed, after EXIF orientation."""

    width: int
    height: int


class Compute(BaseModel):
    """Execution statistics of this image. FLOPs are multiply-accumulates."""

    flops: float = Field(description="Multiply-accumulates executed for this image.")
    static_flops: float = Field(
        description="Multiply-accumulates of the static model for the requested tasks."
    )
    flops_ratio: float = Field(description="flops / static_flops.")
    tokens_ratio: float = Field(description="Fraction of encoder tokens processed.")
    tokens_ratio_per_stage: list[float] = Field(
        description="Fraction of tokens processed in each of the 4 encoder stages."
    )
    blocks_executed: int = Field(description="Encoder blocks that ran.")
    blocks_total: int = Field(description="Encoder blocks of the model.")


class Timing(BaseModel):
    """Milliseconds spent on this request."""

    queue: float = Field(description="From admission to the start of its batch.")
    inference: float = Field(description="The batched forward pass this request was part of.")
    total: float = Field(description="From receiving the request to building the response.")


class TaskOutput(BaseModel):
    """One predicted map, as a PNG of the image's width and height."""

    png: str = Field(
        description=(
            "Base64-encoded PNG. saliency: 8-bit grayscale, value = probability * 255. "
            "human_parts and semseg: palette PNG whose pixel values are class indices. "
            "normals: RGB, value = (n + 1) / 2 * 255 per component."
        )
    )
    classes: list[str] | None = Field(
        None, description="Class names by index; present for human_parts and semseg only."
    )


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    image: ImageSize
    budget: float = Field(description="Compute budget used, a fraction of the static FLOPs.")
    tasks: list[str] = Field(description="Tasks computed, in the checkpoint's order.")
    compute: Compute
    timing_ms: Timing
    outputs: dict[str, TaskOutput] = Field(description="One entry per requested task.")


class ModelInfo(BaseModel):
    """The served checkpoint."""

    name: str
    version: str
    preset: str = Field(description="Architecture preset the checkpoint was built from.")
    tasks: list[str]
    classes: dict[str, list[str]] = Field(description="Class names by index, per task.")
    input_size: int = Field(description="Side of the square model input in pixels.")
    static_flops: float = Field(
        description="Multiply-accumulates per image of the static model with every task."
    )
    static_flops_per_task: dict[str, float] = Field(
        description="Multiply-accumulates of the static model for each task alone."
    )
    budget_range: tuple[float, float] = Field(description="Smallest and largest valid budget.")
    provenance: dict[str, Any] = Field(description="How the checkpoint was trained.")
    metrics: dict[str, Any] = Field(description="Evaluation figures stored in the checkpoint.")


class HealthStatus(BaseModel):
    status: str = Field(examples=["ok"])
