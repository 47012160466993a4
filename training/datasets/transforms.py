"""Augmentations and resizing on raw numpy samples (see `training.datasets.common`).

The training chain follows the MTI-Net protocol of the multi-task dense-prediction literature
(Vandenhende et al., Multi-Task-Learning-PyTorch, `get_transformations` for PASCAL-Context):

1. random horizontal flip, p = 0.5, which negates the normals' x component;
2. one random scale in [0.75, 1.25] and one rotation in [-20, 20] degrees about the image
   centre, with the output size unchanged. Borders are filled with 0, which is background for
   the label maps and invalid for normals. The normals' in-plane components rotate too;
3. resize of every map to the model's square input size, without keeping the aspect ratio;
4. ignore regions: invalid normals become IGNORE_INDEX in all three channels, and a human parts
   map without any part pixel becomes entirely IGNORE_INDEX.

The test chain is steps 3 and 4. Interpolation per key: image bicubic, normals bicubic and then
renormalised to unit length, saliency, human parts and semseg nearest.

Every transform is a callable `raw -> raw` that returns a new dict and leaves its input alone.
Random transforms draw from a `numpy.random.Generator` given at construction (or built from a
seed), so a pipeline is reproducible. `Compose.reseed` gives each DataLoader worker its own
stream, because a generator copied into forked workers repeats the same draws in each of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from model_core.presets import IGNORE_INDEX

RawSample = dict[str, Any]
RngLike = np.random.Generator | int | None

# Label maps with one value per pixel, resized and warped with nearest-neighbour sampling.
LABEL_KEYS: tuple[str, ...] = ("saliency", "human_parts", "semseg")

# The MTI-Net protocol's augmentation ranges.
DEFAULT_SCALES: tuple[float, float] = (0.75, 1.25)
DEFAULT_DEGREES: tuple[float, float] = (-20.0, 20.0)

_NEAREST = Image.Resampling.NEAREST
_BICUBIC = Image.Resampling.BICUBIC

__all__ = [
    "AddIgnoreRegions",
    "Compose",
    "RandomHorizontalFlip",
    "RandomScaleRotate",
    "Resize",
    "add_ignore_regions",
    "hflip",
    "resize",
    "scale_rotate",
    "test_transform",
    "train_transform",
]


# Geometry helpers. Each works on one 2-D map or on an RGB uint8 image through PIL, which
# supports float32 ("F") maps for all three resampling filters used here.


def _warp_map(
    array: np.ndarray,
    size: tuple[int, int],
    resample: Image.Resampling,
    affine: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Resize (affine None) or affine-warp one (H, W) float map or (H, W, 3) uint8 image.

    `size` is (height, width) of the output. `affine` contains PIL's six inverse coefficients
    (a, b, c, d, e, f) that map an output position (x, y) to the input (a x + b y + c,
    d x + e y + f). Areas outside the input are filled with 0.
    """
    height, width = size
    if array.ndim == 2:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    else:
        image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    if affine is None:
        out = image.resize((width, height), resample)
    else:
        out = image.transform(
            (width, height), Image.Transform.AFFINE, affine, resample, fillcolor=0
        )
    return np.asarray(out).copy()


def _split_normals(normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (H, W, 3) normals into zero-filled vectors and a validity mask (H, W) bool."""
    valid = ~np.any(normals == IGNORE_INDEX, axis=2)
    vectors = np.where(valid[..., None], normals, 0.0).astype(np.float32)
    return vectors, valid


def _join_normals(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Renormalise (H, W, 3) vectors to unit length and write IGNORE_INDEX where invalid.

    A pixel stays valid only if `valid` marks it and its interpolated vector is not
    (numerically) zero.
    """
    norm = np.linalg.norm(vectors, axis=2)
    valid = valid & (norm > 1e-6)
    unit = vectors / np.maximum(norm, 1e-6)[..., None]
    return np.where(valid[..., None], unit, np.float32(IGNORE_INDEX)).astype(np.float32)


def _warp_normals(
    normals: np.ndarray,
    size: tuple[int, int],
    affine: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Resize or warp (H, W, 3) normals: vectors bicubic, validity nearest, then renormalise.

    Invalid pixels are zero vectors during interpolation, so they only shorten their valid
    neighbours, and renormalisation restores those to unit length. The validity mask is warped
    with nearest sampling and filled with invalid outside the input.

    NOTE: this keeps the valid region's shape. The reference MTI-Net code interpolates the
    zero-filled vectors only and keeps every non-zero result, which turns a rim of invalid
    pixels around each valid region into valid ones.
    """
    vectors, valid = _split_normals(normals)
    channels = [_warp_map(vectors[..., c], size, _BICUBIC, affine) for c in range(3)]
    warped_valid = _warp_map(valid.astype(np.float32), size, _NEAREST, affine) > 0.5
    return _join_normals(np.stack(channels, axis=2), warped_valid)


def _as_generator(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# Deterministic transforms as pure functions of a raw sample.


def hflip(sample: RawSample) -> RawSample:
    """Mirror every map left to right and negate the normals' x component (channel 0)."""
    out = dict(sample)
    for key in ("image", *LABEL_KEYS):
        if key in sample:
            out[key] = np.ascontiguousarray(sample[key][:, ::-1])
    if "normals" in sample:
        normals = np.ascontiguousarray(sample["normals"][:, ::-1], dtype=np.float32)
        valid = normals[..., 0] != IGNORE_INDEX
        normals[..., 0] = np.where(valid, -normals[..., 0], normals[..., 0])
        out["normals"] = normals
    return out


def scale_rotate(sample: RawSample, degrees: float, scale: float) -> RawSample:
    """Rotate every map by `degrees` counter-clockwise and scale it by `scale` about its centre.

    The output keeps the input size. Areas that come from outside the input are 0 in the image
    and the label maps and invalid (IGNORE_INDEX) in the normals. The normals' in-plane vector
    (channel 0 right, channel 1 up, as `training.datasets.common` defines them) rotates
    counter-clockwise by the same angle, so a normal that points right points up after +90.

    NOTE: the reference MTI-Net code rotates (channel 0, channel 1) the other way round, which
    is only consistent if channel 1 points down. The distilled PASCAL normals do not document
    their axes, so this follows the project's convention.
    """
    height, width = sample["image"].shape[:2]
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)

    # Forward map in pixel coordinates (y down): out = c + s * R (in - c) with a visually
    # counter-clockwise R = [[cos, sin], [-sin, cos]]. PIL needs the inverse,
    # in = c + R^T (out - c) / s.
    cx, cy = width / 2.0, height / 2.0
    a, b = cos / scale, -sin / scale
    d, e = sin / scale, cos / scale
    affine = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)

    size = (height, width)
    out = dict(sample)
    out["image"] = _warp_map(sample["image"], size, _BICUBIC, affine)
    for key in LABEL_KEYS:
        if key in sample:
            out[key] = _warp_map(sample[key], size, _NEAREST, affine)
    if "normals" in sample:
        vectors, valid = _split_normals(sample["normals"])
        x, y = vectors[..., 0].copy(), vectors[..., 1].copy()
        vectors[..., 0] = cos * x - sin * y
        vectors[..., 1] = sin * x + cos * y
        rotated = np.where(valid[..., None], vectors, np.float32(IGNORE_INDEX))
        out["normals"] = _warp_normals(rotated, size, affine)
    return out


def resize(sample: RawSample, size: int | tuple[int, int]) -> RawSample:
    """Resize every map to `size` (an int for a square, or (height, width)).

    The aspect ratio is not kept. The image is resampled bicubically with PIL, which low-pass
    filters when it shrinks (OpenCV's bicubic in the reference code does not). Label maps use
    nearest sampling. Normals are resampled bicubically and renormalised, with invalid pixels
    kept at IGNORE_INDEX. "meta" is kept, so meta["size"] is still the original size. A sample
    whose maps are all at `size` already is returned unchanged, in a new dict.
    """
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if all(value.shape[:2] == shape for key, value in sample.items() if key != "meta"):
        # Procedural scenes are rendered at the model's size. For them PIL would only copy
        # every map, and the normals would be renormalised once more.
        return dict(sample)
    out = dict(sample)
    out["image"] = _warp_map(sample["image"], shape, _BICUBIC)
    for key in LABEL_KEYS:
        if key in sample:
            out[key] = _warp_map(sample[key], shape, _NEAREST)
    if "normals" in sample:
        out["normals"] = _warp_normals(sample["normals"], shape)
    return out


def add_ignore_regions(sample: RawSample) -> RawSample:
    """Mark normals with zero length, and human parts maps without any part, as ignored.

    A human parts map that is entirely background (0) or entirely ignored becomes entirely
    IGNORE_INDEX, as in the reference code: an image without annotated people then trains no
    pixel as background. This also applies when a rotation has moved every part out of view.
    """
    out = dict(sample)
    if "normals" in sample:
        out["normals"] = _join_normals(*_split_normals(sample["normals"]))
    if "human_parts" in sample:
        parts = sample["human_parts"]
        if not np.any((parts != 0) & (parts != IGNORE_INDEX)):
            out["human_parts"] = np.full_like(parts, IGNORE_INDEX, dtype=np.float32)
    return out


# Callable transform objects, so that pipelines compose.


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Iterable[Callable[[RawSample], RawSample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: RawSample) -> RawSample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def reseed(self, seed: int | Sequence[int]) -> None:
        """Give the random transforms one new generator built from `seed`.

        Call it in a DataLoader `worker_init_fn`, e.g. with (base_seed, worker_id).
        """
        rng = np.random.default_rng(seed)
        for transform in self.transforms:
            if hasattr(transform, "rng"):
                transform.rng = rng

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip the sample with probability `p` (see `hflip`)."""

    def __init__(self, p: float = 0.5, rng: RngLike = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"invalid flip probability {p}: must be in [0, 1]")
        self.p = p
        self.rng = _as_generator(rng)

    def __call__(self, sample: RawSample) -> RawSample:
        if self.rng.random() < self.p:
            return hflip(sample)
        return sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScaleRotate:
    """Scale and rotate the sample by a uniform random scale and angle (see `scale_rotate`).

    Args:
        scales: (low, high) range of the scale factor.
        degrees: (low, high) range of the counter-clockwise angle in degrees.
        rng: Generator or seed of the draws.
    """

    def __init__(
        self,
        scales: tuple[float, float] = DEFAULT_SCALES,
        degrees: tuple[float, float] = DEFAULT_DEGREES,
        rng: RngLike = None,
    ) -> None:
        if not 0.0 < scales[0] <= scales[1]:
            raise ValueError(f"invalid scale range {scales}: need 0 < low <= high")
        if degrees[0] > degrees[1]:
            raise ValueError(f"invalid angle range {degrees}: need low <= high")
        self.scales = tuple(scales)
        self.degrees = tuple(degrees)
        self.rng = _as_generator(rng)

    def __call__(self, sample: RawSample) -> RawSample:
        angle = float(self.rng.uniform(*self.degrees))
        scale = float(self.rng.uniform(*self.scales))
        return scale_rotate(sample, angle, scale)

    def __repr__(self) -> str:
        return f"RandomScaleRotate(scales={self.scales}, degrees={self.degrees})"


class Resize:
    """Resize every map to a square of side `size` (see `resize`)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = size

    def __call__(self, sample: RawSample) -> RawSample:
        return resize(sample, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class AddIgnoreRegions:
    """Mark invalid normals and human parts maps without parts as ignored (see
    `add_ignore_regions`)."""

    def __call__(self, sample: RawSample) -> RawSample:
        return add_ignore_regions(sample)

    def __repr__(self) -> str:
        return "AddIgnoreRegions()"


def train_transform(size: int, rng: RngLike = None) -> Compose:
    """Build the MTI-Net training chain (flip, scale and rotate, resize, ignore regions).

    Args:
        size: Side of the square model input in pixels (the preset's img_size).
        rng: Generator or seed that both random transforms draw from.
    """
    generator = _as_generator(rng)
    return Compose(
        [
            RandomHorizontalFlip(0.5, generator),
            RandomScaleRotate(DEFAULT_SCALES, DEFAULT_DEGREES, generator),
            Resize(size),
            AddIgnoreRegions(),
        ]
    )


def test_transform(size: int) -> Compose:
    """Build the evaluation chain (resize, ignore regions)."""
    return Compose([Resize(size), AddIgnoreRegions()])


# The name starts with "test", so keep pytest from collecting it where a test module imports it.
test_transform.__test__ = False
