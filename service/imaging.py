"""Image decoding for requests and PNG encoding of the predicted maps.

Decoding reads the header first and checks the pixel count before any pixel data is
decompressed, so a small file that declares a huge image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import io
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

# Formats Pillow may try when identifying an upload; everything else is rejected with 415.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

# ISA-L's level of the output PNGs (0 to 3). Level 1 compressed a 640x480 normals map to 192
# KB in 1.5 ms, where zlib-ng's Huffman coding alone gave 226 KB in 3.0 ms (one core of the
# development machine).
PNG_COMPRESS_LEVEL = 1

# Filtered maps of at least this many bytes are compressed in two halves when `png_bytes` gets
# a helper thread. A 640x480 RGB map is 922 KB.
SPLIT_DEFLATE_BYTES = 512 * 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types and row filters (PNG specification, sections 11.2.2 and 9.2).
_GREY, _RGB, _PALETTE = 0, 2, 3
_FILTER_NONE, _FILTER_UP = 0, 2

# EXIF orientations that rotate by 90 or 270 degrees, so width and height trade places.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

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


@dataclass(frozen=True)
class DecodedImage:
    """An upload decoded for the model.

    Attributes:
        pixels: upright 8-bit RGB image. A JPEG may be decoded at a reduced scale (see
            `decode_upload`), so this size can be smaller than the displayed one.
        width: displayed width of the full image, after EXIF orientation.
        height: displayed height.
    """

    pixels: Image.Image
    width: int
    height: int


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image into an upright 8-bit RGB image at its full size.

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
    return decode_upload(data, max_pixels).pixels


def decode_upload(
    data: bytes,
    max_pixels: int,
    min_side: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> DecodedImage:
    """Decode an upload like `decode_image`, at a reduced scale where a JPEG allows it.

    With `min_side`, a JPEG is decoded at the smallest of the scales 1/8, 1/4, 1/2 and 1 that
    keeps both sides at least `min_side` pixels (libjpeg scales while it decodes, which is
    several times faster than decoding everything and resizing). A model whose input is
    `min_side` pixels square loses nothing it would keep. Other formats decode at full size.

    `reserve`, if given, is called with the number of pixels to be decoded (at the reduced
    scale of a JPEG) after the header checks and before any pixel data is decompressed. An
    exception it raises propagates unchanged, and nothing is decoded.

    Raises:
        The errors of `decode_image`, and those of `reserve`.
    """
    # NOTE: Pillow raises its own DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS
    # (about 179 megapixels by default), so a larger max_pixels has no effect past that.
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        failure = _header_failure(data)
        if failure is not None:
            image_format, reason = failure
            raise InvalidImageError(
                f"the {image_format} image header could not be read ({reason}): check that the "
                "file is complete and not corrupted"
            ) from exc
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
        # MPO files (a JPEG followed by more pictures, as some cameras write) decode the same way.
        if min_side is not None and isinstance(image, JpegImagePlugin.JpegImageFile):
            image.draft("RGB", (min_side, min_side))
    except Exception as exc:  # noqa: BLE001  # as for load() below
        raise _undecodable(image, exc) from exc
    if reserve is not None:
        reserve(image.width * image.height)  # draft() has set the reduced size of a JPEG

    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        image = ImageOps.exif_transpose(image)
        return DecodedImage(to_rgb(image), width, height)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image is too large: {exc}") from exc
    except Exception as exc:  # noqa: BLE001
        # Pillow's decoders raise many types on malformed data (OSError, SyntaxError,
        # struct.error, IndexError, ...); every one of them means a bad upload, not a bug here.
        raise _undecodable(image, exc) from exc


def _undecodable(image: Image.Image, error: Exception) -> InvalidImageError:
    return InvalidImageError(
        f"the {image.format} image could not be decoded ({error}): check that the file is complete"
    )


def _header_failure(data: bytes) -> tuple[str, str] | None:
    """Find the supported format whose signature `data` starts with, and why its header fails.

    Pillow's `Image.open` raises UnidentifiedImageError both for unknown data and for a file
    whose plugin recognises the signature but fails on the header, such as a PNG cut off before
    its first IDAT chunk or with a bad chunk CRC. It drops the plugin's error, so the plugin
    opens the header again here to report it. Returns (format, error) or None for unknown data.
    """
    Image.init()
    prefix = data[:16]  # what Image.open passes to each plugin's signature check
    for image_format in SUPPORTED_FORMATS:
        factory, accept = Image.OPEN.get(image_format, (None, None))
        if factory is None or accept is None:
            continue
        recognised = accept(prefix)
        # The WebP plugin returns a string when Pillow was built without WebP: that stays 415.
        if isinstance(recognised, str) or not recognised:
            continue
        try:
            factory(io.BytesIO(data), "")
        except Exception as exc:  # noqa: BLE001  # any error here describes the bad header
            return image_format, str(exc) or type(exc).__name__
        return image_format, "Pillow could not identify it"
    return None


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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    checksum = isal_zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)


def _deflate(data: memoryview, final: bool) -> bytes:
    # Raw deflate, without zlib's header and checksum. A part that is not the last ends on a
    # byte boundary (Z_SYNC_FLUSH), so the parts concatenate into one valid stream.
    compressor = isal_zlib.compressobj(PNG_COMPRESS_LEVEL, isal_zlib.DEFLATED, -15)
    body = compressor.compress(data)
    return body + (compressor.flush() if final else compressor.flush(isal_zlib.Z_SYNC_FLUSH))


def _zlib_stream(scanlines: np.ndarray, helper: Executor | None) -> bytes:
    """Compress the filtered scanlines into a zlib stream (RFC 1950), in two halves if large."""
    if helper is None or scanlines.nbytes < SPLIT_DEFLATE_BYTES:
        return isal_zlib.compress(scanlines.data, PNG_COMPRESS_LEVEL)
    middle = scanlines.shape[0] // 2
    try:
        second = helper.submit(_deflate, scanlines[middle:].data, True)
    except RuntimeError:  # the helper has shut down
        second = None
    first = _deflate(scanlines[:middle].data, False)
    # When the helper has not started on the second half yet (it is busy with other maps),
    # this thread compresses it itself instead of waiting.
    if second is None or second.cancel():
        second_part = _deflate(scanlines[middle:].data, True)
    else:
        second_part = second.result()
    checksum = isal_zlib.adler32(scanlines.data)
    # 0x78 0x01: deflate with a 32 KB window, compression level flag 0 (fastest).
    return b"\x78\x01" + first + second_part + struct.pack(">I", checksum)


def png_bytes(
    levels: np.ndarray,
    palette: Sequence[int] | None = None,
    smooth: bool = False,
    helper: Executor | None = None,
) -> bytes:
    """Write an 8-bit PNG of a (H, W) or (H, W, 3) uint8 array.

    Pillow's encoder took about 20 ms for a 640x480 RGB normals map on one core, and still
    11 ms at compression level 0, so most of its time goes to work other than zlib (measured
    on the development machine). This writer applies one row filter, chosen by the caller,
    in numpy, and compresses with Intel's ISA-L (the `isal` package) at level 1. On one core
    of the development machine, the four maps of a 640x480 image took 4.0 ms to encode,
    against 8.1 ms with zlib-ng's fastest settings for each map, and gave 348 KB of base64
    against 393 KB. The compressor releases the interpreter lock, so several maps can encode
    in parallel.

    Args:
        levels: (H, W) grey or palette indices, or (H, W, 3) RGB.
        palette: flat RGB palette for a (H, W) index map, three entries per colour.
        smooth: filter each row as its difference from the row above (PNG filter "Up"),
            which compresses smooth maps (saliency, normals) much better. Label maps compress
            best without a filter.
        helper: a thread that compresses the second half of a large map while the calling
            thread compresses the first. The halves form one zlib stream of about the same
            size, not byte-identical to a single pass.

    Returns:
        The PNG file.
    """
    if (
        levels.dtype != np.uint8
        or levels.ndim not in (2, 3)
        or levels.shape[0] * levels.shape[1] == 0
    ):
        raise ValueError(
            f"need a non-empty (H, W) or (H, W, 3) uint8 array, got {levels.dtype} {levels.shape}"
        )
    height, width = levels.shape[:2]
    channels = 1 if levels.ndim == 2 else levels.shape[2]
    if channels not in (1, 3) or (palette is not None and channels != 1):
        raise ValueError(f"cannot write {levels.shape} as a grey, palette or RGB PNG")
    rows = np.ascontiguousarray(levels).reshape(height, width * channels)
    scanlines = np.empty((height, width * channels + 1), dtype=np.uint8)
    scanlines[:, 0] = _FILTER_UP if smooth else _FILTER_NONE
    scanlines[:, 1:] = rows
    if smooth:
        # uint8 arithmetic wraps modulo 256, as the filter requires; row 0 has a zero row above.
        np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])
    data = _zlib_stream(scanlines, helper)

    if channels == 3:
        colour_type = _RGB
    elif palette is None:
        colour_type = _GREY
    else:
        colour_type = _PALETTE
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    parts = [_PNG_SIGNATURE, _png_chunk(b"IHDR", header)]
    if palette is not None:
        parts.append(_png_chunk(b"PLTE", bytes(palette)))
    parts += [_png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")]
    return b"".join(parts)


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_levels(values: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """Return round((values + offset) * scale) clipped to [0, 255] as uint8.

    The arithmetic runs in place on one temporary array, which took 0.36 ms for a 640x480
    normals map where the same expression with a new array per step took 2.3 ms (one core of
    the development machine). The result is the same.
    """
    levels = np.asarray(values) + offset
    levels *= scale
    np.round(levels, out=levels)
    np.clip(levels, 0, 255, out=levels)
    return levels.astype(np.uint8)


def encode_saliency(probability: np.ndarray, helper: Executor | None = None) -> str:
    """Encode a (H, W) float map in [0, 1] as an 8-bit grayscale PNG (255 = probability 1)."""
    return _base64(png_bytes(_to_levels(probability, 0.0, 255.0), smooth=True, helper=helper))


def encode_labels(labels: np.ndarray, classes: Sequence[str]) -> str:
    """Encode a (H, W) uint8 class-index map as a palette PNG whose pixel values are the indices."""
    labels = np.asarray(labels, dtype=np.uint8)
    num_colours = max(len(classes), int(labels.max()) + 1)
    palette = class_palette(num_colours)[: 3 * num_colours]
    return _base64(png_bytes(labels, palette=palette))


def encode_normals(normals: np.ndarray, helper: Executor | None = None) -> str:
    """Encode (H, W, 3) unit normals as an RGB PNG with value = (n + 1) / 2 * 255."""
    levels = _to_levels(normals, 1.0, 127.5)
    return _base64(png_bytes(levels, smooth=True, helper=helper))
