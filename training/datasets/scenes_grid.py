"""Draw example procedural scenes next to their four label maps, for the docs.

    python -m training.datasets.scenes_grid --out docs/images/scenes.png

Rows go from the simplest to the most cluttered scene. Columns: the image after JPEG, semantic
classes, human parts (grey where ignored), surface normals as stored, saliency.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model_core.presets import IGNORE_INDEX
from training.datasets.scene_layout import sample_scene
from training.datasets.scene_render import render
from training.datasets.scenes import encode_normals, image_rng

SEMSEG_PALETTE = np.array(
    [
        [90, 70, 50],  # floor
        [150, 150, 170],  # wall
        [230, 25, 75],  # sphere
        [60, 180, 75],  # box
        [255, 225, 25],  # cylinder
        [0, 130, 200],  # cone
        [245, 130, 48],  # torus
        [145, 30, 180],  # ellipsoid
        [240, 50, 230],  # person
    ],
    dtype=np.uint8,
)
PARTS_PALETTE = np.array(
    [
        [0, 0, 0],
        [255, 80, 80],
        [80, 200, 80],
        [80, 120, 255],
        [0, 220, 220],
        [255, 220, 0],
        [255, 120, 0],
    ],
    dtype=np.uint8,
)
COLUMNS = ("image", "semseg", "human parts", "normals", "saliency")
_HEADER = 18


def _parts_colors(parts: np.ndarray) -> np.ndarray:
    ignored = parts == IGNORE_INDEX
    colors = PARTS_PALETTE[np.where(ignored, 0, parts)]
    colors[ignored] = 96
    return colors


def _jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=2)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def draw_grid(rows: int, size: int, seed: int) -> Image.Image:
    """Render `rows` scenes of `size` px at clutter evenly spread over [0, 1] into one image."""
    tiles = []
    for row in range(rows):
        rng = image_rng(seed, "grid", row)
        clutter = row / max(rows - 1, 1)
        rendered = render(sample_scene(rng, clutter=clutter), size, rng)
        saliency = np.repeat(rendered.saliency[..., None] * np.uint8(255), 3, axis=2)
        tiles.append(
            [
                _jpeg_round_trip(rendered.image, rendered.jpeg_quality),
                SEMSEG_PALETTE[rendered.semseg],
                _parts_colors(rendered.human_parts),
                encode_normals(rendered.normals),
                saliency,
            ]
        )
    gap = 4
    width = len(COLUMNS) * (size + gap) - gap
    canvas = Image.new("RGB", (width, _HEADER + rows * (size + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(COLUMNS):
        draw.text((column * (size + gap) + 4, 3), title, fill="black")
    for row, images in enumerate(tiles):
        for column, tile in enumerate(images):
            canvas.paste(
                Image.fromarray(tile), (column * (size + gap), _HEADER + row * (size + gap))
            )
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw example scenes with their label maps.")
    parser.add_argument("--out", required=True, help="path of the PNG to write")
    parser.add_argument("--rows", type=int, default=6, help="number of example scenes")
    parser.add_argument("--size", type=int, default=160, help="side of each tile in pixels")
    parser.add_argument("--seed", type=int, default=1, help="seed of the example scenes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_grid(args.rows, args.size, args.seed).save(out, format="PNG", optimize=True)


if __name__ == "__main__":
    main()
