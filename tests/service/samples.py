"""Hard image inputs, derived from the test photographs at run time."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, PngImagePlugin


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def open_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def exif_rotated_jpeg(photo: bytes) -> bytes:
    """The photo as a JPEG with EXIF orientation 6: displayed rotated 90 degrees clockwise."""
    image = open_rgb(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _save(image, "JPEG", exif=exif, quality=90)


def cmyk_jpeg(photo: bytes) -> bytes:
    return _save(open_rgb(photo).convert("CMYK"), "JPEG", quality=90)


def gray16_png(photo: bytes) -> bytes:
    """The photo's luminance as a 16-bit grayscale PNG."""
    gray = np.asarray(open_rgb(photo).convert("L"), dtype=np.uint16) * 257
    return _save(Image.fromarray(gray), "PNG")


def palette_alpha_png(photo: bytes) -> bytes:
    """The photo as a palette PNG whose index 0 is transparent."""
    image = open_rgb(photo).quantize(colors=64)
    return _save(image, "PNG", transparency=0)


def rgba_png(photo: bytes) -> bytes:
    image = open_rgb(photo).convert("RGBA")
    alpha = Image.linear_gradient("L").resize(image.size)
    image.putalpha(alpha)
    return _save(image, "PNG")


def animated_gif(photo: bytes) -> bytes:
    """Three frames: the photo, then its mirror image, then its upside-down copy."""
    image = open_rgb(photo)
    frames = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image.rotate(180)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated_jpeg(photo: bytes) -> bytes:
    """The first half of the photo's JPEG file."""
    data = _save(open_rgb(photo), "JPEG", quality=90)
    return data[: len(data) // 2]


def png_header(width: int, height: int) -> bytes:
    """A valid PNG that declares `width` x `height` pixels but carries one compressed row.

    Opening it costs nothing; decoding it fully would allocate width * height * 3 bytes.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    row = zlib.compress(b"\x00" * (1 + 3 * min(width, 4096)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def resized_jpeg(photo: bytes, width: int, height: int) -> bytes:
    return _save(open_rgb(photo).resize((width, height)), "JPEG", quality=85)


def _png_with_text(photo: bytes) -> bytes:
    """The photo as a PNG with a tEXt chunk before its image data."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a test comment")
    return _save(open_rgb(photo), "PNG", pnginfo=info)


def png_cut_before_idat(photo: bytes) -> bytes:
    """The photo's PNG file cut off right before its first IDAT chunk."""
    data = _png_with_text(photo)
    return data[: data.index(b"IDAT") - 4]  # the chunk starts with its 4-byte length


def png_bad_text_crc(photo: bytes) -> bytes:
    """The photo's PNG file with one byte of its tEXt chunk changed, so the chunk's CRC fails."""
    data = bytearray(_png_with_text(photo))
    data[data.index(b"tEXt") + 6] ^= 0x01
    return bytes(data)
