import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from service import imaging
from tests.service import samples
from tests.service.conftest import photo_bytes

LIMIT = 40_000_000


@pytest.fixture(scope="module")
def cat() -> bytes:
    return photo_bytes("chelsea.png")


def decode_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_decode_photo_keeps_size(cat):
    image = imaging.decode_image(cat, LIMIT)
    assert image.mode == "RGB"
    assert image.size == (451, 300)


@pytest.mark.parametrize(
    "make",
    [
        samples.cmyk_jpeg,
        samples.gray16_png,
        samples.palette_alpha_png,
        samples.rgba_png,
        samples.animated_gif,
    ],
)
def test_decode_converts_to_rgb(cat, make):
    image = imaging.decode_image(make(cat), LIMIT)
    assert image.mode == "RGB"
    assert image.size == (451, 300)


def test_decode_16bit_keeps_range(cat):
    image = imaging.decode_image(samples.gray16_png(cat), LIMIT)
    expected = np.asarray(samples.open_rgb(cat).convert("L"))
    assert np.array_equal(np.asarray(image)[..., 0], expected)


def test_decode_gif_uses_first_frame(cat):
    image = imaging.decode_image(samples.animated_gif(cat), LIMIT)
    first = samples.open_rgb(samples.animated_gif(cat))
    assert np.array_equal(np.asarray(image), np.asarray(first))


def test_decode_applies_exif_orientation(cat):
    image = imaging.decode_image(samples.exif_rotated_jpeg(cat), LIMIT)
    assert image.size == (300, 451)


def test_decode_upload_reduced_jpeg(cat):
    jpeg = samples.exif_rotated_jpeg(cat)  # stored 451x300, displayed 300x451
    full = imaging.decode_image(jpeg, LIMIT)
    reduced = imaging.decode_upload(jpeg, LIMIT, min_side=100)
    # 1/2 keeps both sides above 100 (226x150); 1/4 would give 75 rows.
    assert reduced.pixels.size == (150, 226)
    assert (reduced.width, reduced.height) == (300, 451)
    # Still upright: the reduced decode matches the full one shrunk to its size.
    shrunk = np.asarray(full.resize(reduced.pixels.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(reduced.pixels, dtype=float) - shrunk).mean() < 8

    same = imaging.decode_upload(jpeg, LIMIT, min_side=300)
    assert same.pixels.size == (300, 451)
    png = imaging.decode_upload(samples.rgba_png(cat), LIMIT, min_side=50)
    assert png.pixels.size == (451, 300)
    assert (png.width, png.height) == (451, 300)


def test_decode_alpha_composites_on_white():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    buffer = io.BytesIO()
    transparent.save(buffer, format="PNG")
    image = imaging.decode_image(buffer.getvalue(), LIMIT)
    assert np.all(np.asarray(image) == 255)


def test_decode_rejects_pixel_bomb_before_decoding():
    data = samples.png_header(8000, 8000)
    assert len(data) < 1000
    with pytest.raises(imaging.ImageTooLargeError, match="64000000 pixels"):
        imaging.decode_image(data, LIMIT)


def test_decode_rejects_huge_declared_size():
    # Above Pillow's own bomb threshold, which fires while the header is read.
    with pytest.raises(imaging.ImageTooLargeError):
        imaging.decode_image(samples.png_header(60_000, 60_000), LIMIT)


def test_decode_rejects_truncated_jpeg(cat):
    with pytest.raises(imaging.InvalidImageError, match="could not be decoded"):
        imaging.decode_image(samples.truncated_jpeg(cat), LIMIT)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (samples.png_cut_before_idat, "PNG image header could not be read"),
        (samples.png_bad_text_crc, "bad header checksum in b'tEXt'"),
        (lambda photo: photo[:8], "PNG image header could not be read"),
    ],
    ids=["cut before IDAT", "bad tEXt CRC", "signature only"],
)
def test_decode_corrupt_png_is_invalid(cat, damage, reason):
    with pytest.raises(imaging.InvalidImageError, match=reason) as error:
        imaging.decode_image(damage(cat), LIMIT)
    assert error.value.status_code == 400
    assert error.value.error_type == "invalid_image"


@pytest.mark.parametrize("data", [b"hello, world\n", b"%PDF-1.7\n", b"\x00" * 64])
def test_decode_rejects_non_images(data):
    with pytest.raises(imaging.UnsupportedImageError):
        imaging.decode_image(data, LIMIT)


def test_encode_saliency_levels():
    probability = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    image = decode_png(imaging.encode_saliency(probability))
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 128], [255, 64]]


def test_encode_labels_keeps_indices():
    labels = np.array([[0, 1, 2], [8, 7, 0]], dtype=np.uint8)
    image = decode_png(imaging.encode_labels(labels, [f"c{i}" for i in range(9)]))
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), labels)
    palette = image.getpalette()
    assert palette[:3] == [0, 0, 0]
    assert palette[3:6] != palette[6:9]


def test_encode_normals_mapping():
    normals = np.array([[[0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]]], dtype=np.float32)
    image = decode_png(imaging.encode_normals(normals))
    assert image.mode == "RGB"
    assert np.asarray(image).tolist() == [[[128, 128, 255], [0, 255, 128]]]


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (48, 33, 3), (1, 9, 3)])
def test_png_writer_round_trips_through_pillow(shape, smooth):
    # Random values make the "Up" filter wrap around modulo 256 in both directions.
    levels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    image = Image.open(io.BytesIO(imaging.png_bytes(levels, smooth=smooth)))
    image.load()  # decodes every pixel, so a malformed stream fails here
    assert image.mode == ("L" if len(shape) == 2 else "RGB")
    assert image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), levels)


def test_png_writer_palette_and_smooth_maps_compress():
    labels = np.zeros((480, 640), dtype=np.uint8)
    labels[100:300, 200:500] = 3
    data = imaging.png_bytes(labels, palette=imaging.class_palette(4)[:12])
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    assert image.getpalette()[9:12] == imaging.class_palette(4)[9:12]
    assert np.array_equal(np.asarray(image), labels)
    assert len(data) < 5_000, "a two-region label map must compress to a few kilobytes"
    # A smooth map like the model's: random values on a 24x32 grid, resized bilinearly. With
    # "Up", each row becomes small differences from the row above, which compress to about
    # half the size.
    coarse = torch.rand(1, 1, 24, 32, generator=torch.Generator().manual_seed(0))
    smooth = F.interpolate(coarse, size=(480, 640), mode="bilinear", align_corners=False)
    levels = (smooth[0, 0].numpy() * 255).round().astype(np.uint8)
    assert len(imaging.png_bytes(levels, smooth=True)) < 0.6 * len(imaging.png_bytes(levels))


@pytest.mark.parametrize(
    ("levels", "palette", "match"),
    [
        (np.zeros((4, 4), dtype=np.float32), None, "uint8"),
        (np.zeros((0, 4), dtype=np.uint8), None, "non-empty"),
        (np.zeros((4, 4, 4), dtype=np.uint8), None, "cannot write"),
        (np.zeros((4, 4, 3), dtype=np.uint8), [0, 0, 0], "cannot write"),
    ],
)
def test_png_writer_rejects_other_arrays(levels, palette, match):
    with pytest.raises(ValueError, match=match):
        imaging.png_bytes(levels, palette=palette)


def test_class_palette_distinct_for_256_indices():
    palette = imaging.class_palette(256)
    colours = {tuple(palette[i : i + 3]) for i in range(0, len(palette), 3)}
    assert len(colours) == 256


def test_decode_upload_reduces_mpo_scale():
    """A JPEG followed by more pictures (MPO, as some cameras write) decodes reduced too."""
    photo = Image.effect_noise((1600, 1200), 40).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 48))])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"

    decoded = imaging.decode_upload(data, 10**8, min_side=200)
    assert (decoded.width, decoded.height) == (1600, 1200)
    assert decoded.pixels.size == (400, 300)  # 1/8 would give 150 rows


def test_encode_levels_round_and_clip():
    # Values outside the range clip to 0 and 255, and halves round to the even level.
    probability = np.array([[-0.5, 1.5, 0.5 / 255, 2.5 / 255]], dtype=np.float32)
    assert np.asarray(decode_png(imaging.encode_saliency(probability))).tolist() == [[0, 255, 0, 2]]
    normals = np.array([[[-1.5, 1.5, -1.0]]], dtype=np.float32)
    assert np.asarray(decode_png(imaging.encode_normals(normals))).tolist() == [[[0, 255, 0]]]


def smooth_levels(shape: tuple[int, ...]) -> np.ndarray:
    steps = np.random.default_rng(1).integers(0, 3, size=shape, dtype=np.uint8)
    return steps.cumsum(axis=1, dtype=np.uint8)


def read_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image)


@pytest.mark.parametrize("shape", [(480, 640, 3), (1001, 700), (3, 200_000)])
def test_png_split_deflate_round_trips(shape):
    levels = smooth_levels(shape)
    assert levels.nbytes >= imaging.SPLIT_DEFLATE_BYTES
    with ThreadPoolExecutor(max_workers=1) as helper:
        data = imaging.png_bytes(levels, smooth=True, helper=helper)
    assert np.array_equal(read_png(data), levels)
    assert data != imaging.png_bytes(levels, smooth=True)


def test_png_split_deflate_with_busy_helper():
    levels = smooth_levels((480, 640, 3))
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as helper:
        helper.submit(release.wait, 10)
        # The helper never starts the second half, so the caller compresses it itself.
        data = imaging.png_bytes(levels, smooth=True, helper=helper)
        release.set()
    assert np.array_equal(read_png(data), levels)


def test_png_split_deflate_after_helper_shutdown():
    levels = smooth_levels((480, 640, 3))
    helper = ThreadPoolExecutor(max_workers=1)
    helper.shutdown()
    data = imaging.png_bytes(levels, smooth=True, helper=helper)
    assert np.array_equal(read_png(data), levels)


def test_png_small_map_ignores_helper():
    levels = smooth_levels((48, 64, 3))
    with ThreadPoolExecutor(max_workers=1) as helper:
        data = imaging.png_bytes(levels, smooth=True, helper=helper)
    assert data == imaging.png_bytes(levels, smooth=True)
