"""Image decoding for requests and PNG encoding of the predicted maps.

Decoding reads the header first and checks the pixel count before any pixel data is
decompressed, so a small file that declares a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats Pillow may try when identifying an upload; everything else is rejected with 415.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# zlib level of the output PNGs: level 1 is several times faster than the default 6 on large
# maps, and label maps still compress well at it.
PNG_COMPRESS_LEVEL = 1

# Colour that transparent pixels are composited onto before inference.
ALPHA_BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An upload that cannot be turned into an RGB image; `status_code` is the HTTP status."""

    status_code = 400
    error_type = "invalid_image"


class InvalidImageError(ImageError):
    """The data is a supported format but is corrupt or truncated."""


class UnsupportedImageError(ImageError):
    """The data is not an image in one of SUPPORTED_FORMATS."""

    status_code = 415
    error_type = "unsupported_image"


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit."""

    status_code = 413
    error_type = "image_too_large"


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image into an upright 8-bit RGB image.

    EXIF orientation is applied, so the result has the size a viewer displays. Grayscale,
    palette, CMYK, 16-bit and float images are converted to RGB, transparency is composited
    onto ALPHA_BACKGROUND, and an animated image gives its first frame.

    Args:
        data: The encoded file.
        max_pixels: Largest accepted width * height, checked before decompression.

    Raises:
        UnsupportedImageError: `data` is not an image in a supported format.
        ImageTooLargeError: The image has more than `max_pixels` pixels.
        InvalidImageError: The image is corrupt or truncated.
    """
    # NOTE: Pillow raises its own DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS
    # (about 179 megapixels by default), so a larger max_pixels has no effect past that.
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(
            f"the upload is not a supported image: send one of {', '.join(SUPPORTED_FORMATS)}"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"the image header could not be read ({exc})") from exc

    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"the image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels: downscale it before sending"
        )

    try:
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        # Pillow's decoders raise many types on malformed data (OSError, SyntaxError,
        # struct.error, IndexError, ...); every one of them means a bad upload, not a bug here.
        raise InvalidImageError(
            f"the {image.format} image could not be decoded ({exc}): check that the file "
            "is complete"
        ) from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (or 32-bit integer) grayscale: keep the 16-bit range and drop the low byte.
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # NOTE: CMYK is converted without its ICC profile, so colours may shift slightly.
    return image.convert("RGB")


def class_palette(num_classes: int) -> list[int]:
    """Build a flat 256-entry RGB palette that gives each class index a distinct colour.

    The bits of the class index are spread over the high bits of the three channels, the
    scheme of the PASCAL VOC label images, so index 0 is black and neighbours differ strongly.
    """
    palette: list[int] = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for shift in range(7, -1, -1):
            red |= (code & 1) << shift
            green |= ((code >> 1) & 1) << shift
            blue |= ((code >> 2) & 1) << shift
            code >>= 3
            if code == 0:
                break
        palette.extend((red, green, blue))
    assert num_classes <= 256, f"a PNG palette holds at most 256 classes, got {num_classes}"
    return palette


def encode_png(image: Image.Image) -> str:
    """Encode an image as PNG and return it as base64 text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_saliency(probability: np.ndarray) -> str:
    """Encode a (H, W) float map in [0, 1] as an 8-bit grayscale PNG (255 = probability 1)."""
    levels = np.clip(np.round(probability * 255.0), 0, 255).astype(np.uint8)
    return encode_png(Image.fromarray(levels))


def encode_labels(labels: np.ndarray, classes: Sequence[str]) -> str:
    """Encode a (H, W) uint8 class-index map as a palette PNG whose pixel values are the indices."""
    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8))
    image.putpalette(class_palette(len(classes)))  # turns the "L" image into "P", indices kept
    return encode_png(image)


def encode_normals(normals: np.ndarray) -> str:
    """Encode (H, W, 3) unit normals as an RGB PNG with value = (n + 1) / 2 * 255."""
    levels = np.clip(np.round((normals + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return encode_png(Image.fromarray(np.ascontiguousarray(levels)))
