"""Tests of the procedural scene generator: geometry, label rules, reproducibility, loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_core.presets import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, SCENE_SEMSEG_CLASSES
from training.datasets.scene_geometry import cast_rays, pixel_rays
from training.datasets.scene_layout import OBJECT_KINDS, PERSON, sample_scene
from training.datasets.scene_render import render
from training.datasets.scenes import ScenesDataset, generate_split

FLOOR, WALL = SCENE_SEMSEG_CLASSES.index("floor"), SCENE_SEMSEG_CLASSES.index("wall")


def _expected_normal_and_residual(
    kind: str, size: tuple, p: np.ndarray
) -> tuple[np.ndarray, float]:
    """Return the outward unit normal of the shape at local point p and how far p is off it.

    Written from the implicit form of each shape, independently of the renderer's code.
    """
    if kind == "plane":
        return np.array([0.0, 1.0, 0.0]), abs(p[1])
    if kind == "sphere":
        return p / np.linalg.norm(p), abs(np.linalg.norm(p) - size[0])
    if kind == "ellipsoid":
        axes = np.asarray(size)
        gradient = p / axes**2
        return gradient / np.linalg.norm(gradient), abs(np.sum((p / axes) ** 2) - 1.0)
    if kind == "box":
        ratio = np.abs(p) / np.asarray(size)
        axis = int(np.argmax(ratio))
        normal = np.zeros(3)
        normal[axis] = np.sign(p[axis])
        return normal, abs(ratio[axis] - 1.0)
    if kind == "capsule":
        radius, half = size
        offset = p - np.array([0.0, np.clip(p[1], -half, half), 0.0])
        return offset / np.linalg.norm(offset), abs(np.linalg.norm(offset) - radius)
    if kind == "torus":
        major, minor = size
        # Gradient of (|p|^2 + R^2 - r^2)^2 - 4 R^2 (x^2 + z^2).
        gradient = 4.0 * (p @ p + major**2 - minor**2) * p - 8.0 * major**2 * p * np.array(
            [1.0, 0.0, 1.0]
        )
        tube = np.hypot(np.hypot(p[0], p[2]) - major, p[1]) - minor
        return gradient / np.linalg.norm(gradient), abs(tube)
    radial = np.hypot(p[0], p[2])
    rho = np.array([p[0], 0.0, p[2]]) / max(radial, 1e-12)
    radius, half = size
    if kind == "cylinder":
        cap_gap, side_gap = half - abs(p[1]), radius - radial
        if abs(cap_gap) < abs(side_gap):
            return np.array([0.0, np.sign(p[1]), 0.0]), abs(cap_gap)
        return rho, abs(side_gap)
    assert kind == "cone"
    slope = radius / (2.0 * half)  # radius shrinks by `slope` per unit of height
    base_gap, side_gap = abs(p[1] + half), abs(radial - slope * (half - p[1]))
    if base_gap < side_gap:
        return np.array([0.0, -1.0, 0.0]), base_gap
    side = rho + slope * np.array([0.0, 1.0, 0.0])
    return side / np.linalg.norm(side), side_gap


def test_normals_match_analytic_geometry():
    kinds_seen = set()
    for seed in range(4):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, clutter=1.0, num_objects=12, num_people=3)
        size = 72
        hits = cast_rays(scene.primitives, size, scene.fov_y)
        directions = pixel_rays(size, scene.fov_y)

        lengths = np.linalg.norm(hits.normals, axis=1)
        assert np.allclose(lengths, 1.0, atol=1e-9)
        # Every visible surface faces the camera.
        assert np.all(np.sum(hits.normals * directions, axis=1) < 1e-9)
        assert np.allclose(hits.points, directions * hits.depth[:, None])

        for pixel in range(0, size * size, 7):
            primitive = scene.primitives[hits.index[pixel]]
            kinds_seen.add(primitive.kind)
            local = primitive.to_local(hits.points[pixel])
            assert np.allclose(local, hits.local_points[pixel])
            expected_local, residual = _expected_normal_and_residual(
                primitive.kind, primitive.size, local
            )
            expected = primitive.rotation @ expected_local
            assert residual < 1e-5, f"{primitive.kind} hit point is {residual} off the surface"
            error = np.degrees(np.arccos(np.clip(expected @ hits.normals[pixel], -1.0, 1.0)))
            assert error < 0.01, f"{primitive.kind} normal is {error} degrees off at pixel {pixel}"
    assert kinds_seen == {"plane", "capsule", *OBJECT_KINDS}


def test_parts_only_on_person_pixels():
    people_scenes = 0
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        scene = sample_scene(rng, clutter=0.8, num_people=3)
        rendered = render(scene, 80, rng)
        person = rendered.semseg == PERSON
        if not person.any():
            continue
        people_scenes += 1
        parts = rendered.human_parts
        assert np.all((parts > 0) == person), "part labels must cover exactly the person pixels"
        assert np.all(parts <= 6)
        assert set(np.unique(parts[person])) <= set(range(1, 7))
        # Saliency never marks the room.
        assert not np.any(rendered.saliency[np.isin(rendered.semseg, [FLOOR, WALL])])
    assert people_scenes >= 3


def test_no_people_parts_ignored():
    rng = np.random.default_rng(7)
    rendered = render(sample_scene(rng, clutter=0.5, num_people=0), 64, rng)
    assert not np.any(rendered.semseg == PERSON)
    assert np.all(rendered.human_parts == IGNORE_INDEX)


def test_single_object_simple_label_map():
    classes_seen = set()
    for seed in range(6):
        rng = np.random.default_rng(200 + seed)
        scene = sample_scene(rng, clutter=0.0, num_objects=1, num_people=0)
        rendered = render(scene, 64, rng)
        object_class = scene.primitives[-1].semantic
        labels = set(np.unique(rendered.semseg).tolist())
        assert labels <= {FLOOR, WALL, object_class}
        assert object_class in labels, "the single object should be in view"
        assert FLOOR in labels
        classes_seen.add(object_class)
    assert len(classes_seen) >= 3


def _split_files(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_same_seed_same_bytes(tmp_path):
    first = _split_files(generate_split(tmp_path / "a", "train", 4, 64, seed=3, workers=1))
    second = _split_files(generate_split(tmp_path / "b", "train", 4, 64, seed=3, workers=2))
    other_seed = _split_files(generate_split(tmp_path / "c", "train", 4, 64, seed=4, workers=1))
    other_split = _split_files(generate_split(tmp_path / "d", "val", 4, 64, seed=3, workers=1))

    assert len(first) == 4 * 5 + 1
    assert first == second
    for name in first:
        if name.startswith("images/"):
            assert first[name] != other_seed[name], f"{name} did not change with the seed"
            assert first[name] != other_split[name.replace("train", "val")]


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory) -> Path:
    return generate_split(tmp_path_factory.mktemp("scenes"), "val", 6, 64, seed=11, workers=1)


def test_loader_matches_files(split_dir):
    dataset = ScenesDataset(split_dir.parent, "val")
    assert len(dataset) == 6
    for index in range(len(dataset)):
        sample = dataset[index]
        entry = dataset.images[index]
        name = entry["id"]

        rgb = _read(split_dir / "images" / f"{name}.jpg").astype(np.float32) / 255.0
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        expected_image = torch.from_numpy((rgb - mean) / std).permute(2, 0, 1).float()
        assert torch.allclose(sample["image"], expected_image, atol=1e-5)

        semseg = _read(split_dir / "semseg" / f"{name}.png")
        assert torch.equal(sample["semseg"], torch.from_numpy(semseg.astype(np.int64)))
        parts = _read(split_dir / "human_parts" / f"{name}.png")
        assert torch.equal(sample["human_parts"], torch.from_numpy(parts.astype(np.int64)))
        saliency = _read(split_dir / "saliency" / f"{name}.png")
        assert set(np.unique(saliency).tolist()) <= {0, 255}
        assert torch.equal(
            sample["saliency"][0], torch.from_numpy((saliency == 255).astype(np.float32))
        )

        encoded = _read(split_dir / "normals" / f"{name}.png").astype(np.float64)
        decoded = encoded / 255.0 * 2.0 - 1.0
        decoded /= np.linalg.norm(decoded, axis=-1, keepdims=True)
        assert torch.allclose(
            sample["normals"], torch.from_numpy(decoded).permute(2, 0, 1).float(), atol=1e-5
        )

        assert sample["meta"] == {
            "id": name,
            "size": (64, 64),
            "has_people": entry["has_people"],
            "complexity": entry["complexity"],
        }
        if not entry["has_people"]:
            assert torch.all(sample["human_parts"] == IGNORE_INDEX)
        else:
            assert torch.any((sample["human_parts"] > 0) & (sample["human_parts"] != IGNORE_INDEX))


def test_loader_applies_transform(split_dir):
    def flip(raw):
        flipped = {
            key: np.ascontiguousarray(value[:, ::-1]) for key, value in raw.items() if key != "meta"
        }
        if "normals" in flipped:
            flipped["normals"][..., 0] *= -1.0
        return {**flipped, "meta": raw["meta"]}

    plain = ScenesDataset(split_dir.parent, "val")[0]
    flipped = ScenesDataset(split_dir.parent, "val", transform=flip)[0]
    assert torch.equal(flipped["semseg"], plain["semseg"].flip(-1))
    assert torch.allclose(flipped["normals"][0], -plain["normals"][0].flip(-1))


def test_loader_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ScenesDataset(tmp_path, "train")
