"""Procedural multi-task scenes: the generator CLI and the `ScenesDataset` loader.

    python -m training.datasets.scenes --out data/scenes --count 5000 --size 224 --seed 0 \\
        --split train

writes one folder per split (docs/datasets.md describes the rules behind each label):

    <out>/<split>/manifest.json         classes, tasks, generator version, seed, size, images
    <out>/<split>/images/<id>.jpg       RGB JPEG
    <out>/<split>/semseg/<id>.png       8-bit grey, index into SCENE_SEMSEG_CLASSES
    <out>/<split>/human_parts/<id>.png  8-bit grey, 0 background, 1 to 6 parts; every pixel is
                                        IGNORE_INDEX (255) when no person is visible
    <out>/<split>/normals/<id>.png      RGB, value = round((n + 1) / 2 * 255) per channel, with
                                        n in camera space: x right, y up, z towards the camera
    <out>/<split>/saliency/<id>.png     8-bit grey, 255 salient, 0 not

Image `index` of a split draws everything from numpy's generator seeded with
(seed, crc32(split), index), so the files do not depend on the number of workers, and two
splits with the same seed differ.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from model_core.presets import HUMAN_PARTS_CLASSES, IGNORE_INDEX, SCENE_SEMSEG_CLASSES, TASKS
from training.cli import run_cli
from training.datasets.common import to_tensor_sample
from training.datasets.scene_layout import sample_scene
from training.datasets.scene_render import RenderedScene, render

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
TASK_FOLDERS = {
    "saliency": "saliency",
    "human_parts": "human_parts",
    "semseg": "semseg",
    "normals": "normals",
}
MIN_SIZE = 16

# Fixed encoder options, so that the same Pillow and libjpeg produce the same bytes.
_JPEG_OPTIONS = {"subsampling": 2, "optimize": False, "progressive": False}  # 4:2:0
_PNG_OPTIONS = {"compress_level": 6, "optimize": False}


def image_id(index: int) -> str:
    return f"{index:06d}"


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Return the generator that draws image `index` of `split`."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def render_image(seed: int, split: str, index: int, size: int) -> tuple[RenderedScene, Any]:
    """Sample and render image `index` of `split`, returning the rendering and its scene."""
    rng = image_rng(seed, split, index)
    scene = sample_scene(rng)
    return render(scene, size, rng), scene


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """Map unit normals (H, W, 3) in [-1, 1] to uint8 (H, W, 3) with (n + 1) / 2 * 255."""
    return np.round((normals + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def decode_normals(encoded: np.ndarray) -> np.ndarray:
    """Invert `encode_normals` and rescale to unit length, as float32 (H, W, 3)."""
    normals = encoded.astype(np.float32) / 127.5 - 1.0
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True).clip(1e-6)


def _write_image(task: tuple[Path, int, str, int, int]) -> dict[str, Any]:
    split_dir, seed, split, index, size = task
    rendered, scene = render_image(seed, split, index, size)
    name = image_id(index)
    Image.fromarray(rendered.image).save(
        split_dir / "images" / f"{name}.jpg",
        format="JPEG",
        quality=rendered.jpeg_quality,
        **_JPEG_OPTIONS,
    )
    maps = {
        "semseg": rendered.semseg,
        "human_parts": rendered.human_parts,
        "saliency": rendered.saliency * np.uint8(255),
        "normals": encode_normals(rendered.normals),
    }
    for task_name, array in maps.items():
        path = split_dir / TASK_FOLDERS[task_name] / f"{name}.png"
        Image.fromarray(array).save(path, format="PNG", **_PNG_OPTIONS)
    return {
        "id": name,
        "complexity": round(rendered.complexity, 4),
        "object_count": scene.num_objects,
        "person_count": scene.num_people,
        "has_people": bool(np.any(rendered.human_parts != IGNORE_INDEX)),
        "visible_things": rendered.visible_things,
        "occlusion": round(rendered.occlusion, 4),
        "texture_energy": round(rendered.texture_energy, 5),
    }


def generate_split(
    out: str | Path, split: str, count: int, size: int, seed: int, workers: int = 1
) -> Path:
    """Render `count` images into `out`/`split` and write its manifest, returning the folder."""
    if count < 1:
        raise ValueError(f"invalid count {count}: must be at least 1")
    if size < MIN_SIZE:
        raise ValueError(f"invalid size {size}: must be at least {MIN_SIZE} pixels")
    if workers < 1:
        raise ValueError(f"invalid workers {workers}: must be at least 1")
    if not split or os.sep in split or split in (".", ".."):
        raise ValueError(f"invalid split name {split!r}: use a plain folder name such as 'train'")
    split_dir = Path(out) / split
    for folder in ["images", *TASK_FOLDERS.values()]:
        (split_dir / folder).mkdir(parents=True, exist_ok=True)

    tasks = [(split_dir, seed, split, index, size) for index in range(count)]
    if workers == 1:
        entries = [_write_image(task) for task in tasks]
    else:
        with multiprocessing.Pool(workers) as pool:
            entries = pool.map(
                _write_image, tasks, chunksize=max(1, min(32, count // (4 * workers)))
            )

    manifest = {
        "generator": "training.datasets.scenes",
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "seed": seed,
        "size": size,
        "count": count,
        "tasks": list(TASKS),
        "classes": {"semseg": list(SCENE_SEMSEG_CLASSES), "human_parts": list(HUMAN_PARTS_CLASSES)},
        "ignore_index": IGNORE_INDEX,
        "files": {
            "image": "images/{id}.jpg",
            **{t: f"{TASK_FOLDERS[t]}/{{id}}.png" for t in TASKS},
        },
        "normals_encoding": (
            "value = round((n + 1) / 2 * 255); channel 0 right, 1 up, 2 towards the camera"
        ),
        "images": entries,
    }
    (split_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=1) + "\n", encoding="utf-8"
    )
    return split_dir


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


class ScenesDataset(Dataset):
    """Tensor samples (see `training.datasets.common`) of one split written by `generate_split`.

    Args:
        root: Folder given as --out to the generator.
        split: Split name given as --split.
        transform: Optional callable from a raw numpy sample to a raw numpy sample, applied
            before `to_tensor_sample`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.split_dir = Path(root) / split
        manifest_path = self.split_dir / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"manifest not found: {manifest_path}; generate the split with "
                f"`python -m training.datasets.scenes --out {root} --split {split} ...`"
            )
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if self.manifest.get("generator_version") != GENERATOR_VERSION:
            raise ValueError(
                f"{manifest_path} was written by generator version "
                f"{self.manifest.get('generator_version')}, this loader reads version "
                f"{GENERATOR_VERSION}; regenerate the split"
            )
        self.images: list[dict[str, Any]] = self.manifest["images"]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def load_raw(self, index: int) -> dict[str, Any]:
        """Read image `index` into the raw numpy sample, before any transform."""
        entry = self.images[index]
        name = entry["id"]
        with Image.open(self.split_dir / "images" / f"{name}.jpg") as image:
            rgb = np.array(image.convert("RGB"))
        saliency = _read_png(self.split_dir / TASK_FOLDERS["saliency"] / f"{name}.png")
        normals = _read_png(self.split_dir / TASK_FOLDERS["normals"] / f"{name}.png")
        return {
            "image": rgb,
            "saliency": (saliency > 127).astype(np.float32),
            "human_parts": _read_png(
                self.split_dir / TASK_FOLDERS["human_parts"] / f"{name}.png"
            ).astype(np.float32),
            "semseg": _read_png(self.split_dir / TASK_FOLDERS["semseg"] / f"{name}.png").astype(
                np.float32
            ),
            "normals": decode_normals(normals),
            "meta": {
                "id": name,
                "size": (int(rgb.shape[0]), int(rgb.shape[1])),
                "has_people": bool(entry["has_people"]),
                "complexity": float(entry["complexity"]),
            },
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.load_raw(index)
        if self.transform is not None:
            raw = self.transform(raw)
        return to_tensor_sample(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Render procedural multi-task scenes with exact labels into OUT/SPLIT."
    )
    parser.add_argument(
        "--out", required=True, help="output folder; the split is written to OUT/SPLIT"
    )
    parser.add_argument("--count", type=int, required=True, help="number of images to render")
    parser.add_argument("--size", type=int, default=224, help="side of the square images in pixels")
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed from which each image derives its own"
    )
    parser.add_argument("--split", default="train", help="split name, also the folder name")
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="worker processes (default: the CPU cores this process may use)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logger.info(
        "rendering %d images of %d px into %s/%s with seed %d on %d workers",
        args.count, args.size, args.out, args.split, args.seed, args.workers,
    )  # fmt: skip
    start = time.perf_counter()
    split_dir = generate_split(args.out, args.split, args.count, args.size, args.seed, args.workers)
    elapsed = time.perf_counter() - start
    logger.info(
        "wrote %d images to %s in %.1f s (%.1f images/s)",
        args.count, split_dir, elapsed, args.count / elapsed,
    )  # fmt: skip


if __name__ == "__main__":
    run_cli("python -m training.datasets.scenes", main)
