"""Transforms on raw samples: geometry, per-key interpolation, normals and ignore regions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_core.presets import IGNORE_INDEX
from training.datasets import transforms
from training.datasets.transforms import (
    AddIgnoreRegions,
    Compose,
    RandomHorizontalFlip,
    RandomScaleRotate,
    add_ignore_regions,
    hflip,
    resize,
    scale_rotate,
)


def _sample(height: int = 20, width: int = 20) -> dict:
    """A sample with a marker block right of the centre whose normals point right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[9:11, 15:18] = 200
    marker = np.zeros((height, width), np.float32)
    marker[9:11, 15:18] = 1
    normals = np.full((height, width, 3), IGNORE_INDEX, np.float32)
    normals[9:11, 15:18] = (1.0, 0.0, 0.0)
    parts = marker * 3
    return {
        "image": image,
        "saliency": marker.copy(),
        "human_parts": parts,
        "semseg": marker * 15,
        "normals": normals,
        "meta": {"id": "x", "size": (height, width), "has_people": True, "complexity": None},
    }


def _unit_where_valid(normals: np.ndarray) -> np.ndarray:
    """Return the (H, W) mask of valid pixels after asserting that they are unit vectors."""
    valid = ~np.any(normals == IGNORE_INDEX, axis=2)
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=1), 1.0, atol=1e-5)
    return valid


def test_hflip_mirrors_and_negates_x() -> None:
    sample = _sample()
    sample["normals"][9:11, 15:18] = (0.6, 0.0, 0.8)
    flipped = hflip(sample)
    np.testing.assert_array_equal(flipped["image"], sample["image"][:, ::-1])
    np.testing.assert_array_equal(flipped["semseg"], sample["semseg"][:, ::-1])
    np.testing.assert_allclose(
        flipped["normals"][9:11, 2:5], np.broadcast_to((-0.6, 0, 0.8), (2, 3, 3))
    )
    assert np.all(flipped["normals"][:, 5:] == IGNORE_INDEX)
    assert flipped["meta"] is sample["meta"]


def test_hflip_leaves_input_unchanged() -> None:
    sample = _sample()
    before = sample["normals"].copy()
    hflip(sample)
    np.testing.assert_array_equal(sample["normals"], before)


def test_scale_rotate_identity() -> None:
    sample = _sample()
    out = scale_rotate(sample, 0.0, 1.0)
    for key in ("image", "saliency", "human_parts", "semseg", "normals"):
        np.testing.assert_array_equal(out[key], sample[key])


def test_scale_rotate_quarter_turn() -> None:
    out = scale_rotate(_sample(), 90.0, 1.0)
    # The marker at rows 9-10, columns 15-17 (right of centre) moves above the centre.
    rows, cols = np.nonzero(out["semseg"])
    assert set(rows.tolist()) == {2, 3, 4}
    assert set(cols.tolist()) == {9, 10}
    assert set(np.unique(out["semseg"]).tolist()) == {0.0, 15.0}
    # Its normals turn from right to up.
    valid = _unit_where_valid(out["normals"])
    np.testing.assert_array_equal(valid, out["semseg"] > 0)
    np.testing.assert_allclose(out["normals"][valid], np.tile((0.0, 1.0, 0.0), (6, 1)), atol=1e-6)


def test_scale_rotate_normals_rotation_angle() -> None:
    sample = _sample()
    sample["normals"][:] = (0.6, 0.0, 0.8)
    out = scale_rotate(sample, 30.0, 1.0)
    angle = math.radians(30.0)
    expected = (0.6 * math.cos(angle), 0.6 * math.sin(angle), 0.8)
    np.testing.assert_allclose(out["normals"][10, 10], expected, atol=1e-5)


def test_scale_rotate_fills_borders() -> None:
    sample = _sample()
    sample["semseg"][:] = 15
    sample["normals"][:] = (0.0, 0.0, 1.0)
    sample["image"][:] = 100
    out = scale_rotate(sample, 45.0, 1.0)
    # Corners come from outside the input: background labels, black image, invalid normals.
    assert out["semseg"][0, 0] == 0
    assert np.all(out["image"][0, 0] == 0)
    assert np.all(out["normals"][0, 0] == IGNORE_INDEX)
    # The centre stays labelled.
    assert out["semseg"][10, 10] == 15
    _unit_where_valid(out["normals"])


def test_scale_rotate_zooms_about_centre() -> None:
    sample = _sample()
    sample["semseg"] = np.zeros((20, 20), np.float32)
    sample["semseg"][6:14, 14:18] = 15
    out = scale_rotate(sample, 0.0, 0.5)
    # Relative to the centre (10, 10) the block spans rows -4..4 and columns 4..8; halved,
    # rows -2..2 and columns 2..4, i.e. pixel rows 8-11 and columns 12-13.
    rows, cols = np.nonzero(out["semseg"])
    assert sorted(set(rows.tolist())) == [8, 9, 10, 11]
    assert sorted(set(cols.tolist())) == [12, 13]
    assert len(rows) == 8


def test_resize_nearest_labels() -> None:
    sample = _sample(2, 2)
    sample["semseg"] = np.array([[1, 2], [3, IGNORE_INDEX]], np.float32)
    out = resize(sample, 4)
    expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 255, 255], [3, 3, 255, 255]])
    np.testing.assert_array_equal(out["semseg"], expected)
    assert out["image"].shape == (4, 4, 3)
    assert out["image"].dtype == np.uint8
    assert out["meta"]["size"] == (2, 2)


def test_resize_non_square_input() -> None:
    out = resize(_sample(30, 50), 16)
    for key in ("saliency", "human_parts", "semseg"):
        assert out[key].shape == (16, 16)
        assert out[key].dtype == np.float32
    assert out["normals"].shape == (16, 16, 3)
    assert set(np.unique(out["human_parts"]).tolist()) <= {0.0, 3.0}


def test_resize_to_same_size_keeps_maps() -> None:
    sample = _sample(20, 20)
    out = resize(sample, 20)
    for key in ("image", "saliency", "human_parts", "semseg", "normals"):
        np.testing.assert_array_equal(out[key], sample[key])
    assert out["meta"] is sample["meta"]
    assert out is not sample


def test_resize_normals_keeps_invalid_region() -> None:
    sample = _sample(8, 8)
    normals = np.full((8, 8, 3), IGNORE_INDEX, np.float32)
    normals[:, 4:] = (0.0, 0.6, 0.8)
    normals[:, 6:] = (0.8, 0.0, 0.6)
    sample["normals"] = normals
    out = resize(sample, 16)["normals"]
    assert np.all(out[:, :8] == IGNORE_INDEX)
    valid = _unit_where_valid(out)
    assert valid[:, 8:].all()
    # Away from the boundary between the two valid halves the vectors are unchanged.
    np.testing.assert_allclose(out[:, 8], np.tile((0.0, 0.6, 0.8), (16, 1)), atol=1e-5)
    np.testing.assert_allclose(out[:, 15], np.tile((0.8, 0.0, 0.6), (16, 1)), atol=1e-5)


def test_add_ignore_regions() -> None:
    sample = _sample()
    sample["human_parts"] = np.zeros((20, 20), np.float32)
    sample["normals"][0, 0] = (0.0, 0.0, 0.0)
    out = add_ignore_regions(sample)
    assert np.all(out["human_parts"] == IGNORE_INDEX)
    assert np.all(out["normals"][0, 0] == IGNORE_INDEX)
    np.testing.assert_allclose(out["normals"][9, 15], (1.0, 0.0, 0.0))

    unchanged = add_ignore_regions(_sample())
    np.testing.assert_array_equal(unchanged["human_parts"], _sample()["human_parts"])


def test_random_flip_probability() -> None:
    sample = _sample()
    always = RandomHorizontalFlip(1.0, rng=0)(sample)
    never = RandomHorizontalFlip(0.0, rng=0)(sample)
    np.testing.assert_array_equal(always["semseg"], sample["semseg"][:, ::-1])
    assert never is sample
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)


def test_random_scale_rotate_ranges() -> None:
    with pytest.raises(ValueError, match="scale range"):
        RandomScaleRotate(scales=(0.0, 1.0))
    with pytest.raises(ValueError, match="angle range"):
        RandomScaleRotate(degrees=(10.0, -10.0))
    fixed = RandomScaleRotate(scales=(1.0, 1.0), degrees=(90.0, 90.0), rng=0)(_sample())
    np.testing.assert_array_equal(fixed["semseg"], scale_rotate(_sample(), 90.0, 1.0)["semseg"])


def test_train_transform_is_reproducible() -> None:
    first = transforms.train_transform(32, np.random.default_rng(3))
    second = transforms.train_transform(32, 3)
    outputs = [first(_sample(24, 40)) for _ in range(4)]
    again = [second(_sample(24, 40)) for _ in range(4)]
    for a, b in zip(outputs, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["normals"], b["normals"])
    assert outputs[0]["image"].shape == (32, 32, 3)
    # The four draws are not all the same augmentation.
    assert any(not np.array_equal(outputs[0]["image"], o["image"]) for o in outputs[1:])
    for output in outputs:
        _unit_where_valid(output["normals"])


def test_compose_reseed() -> None:
    transform = transforms.train_transform(16, 0)
    transform.reseed([7, 1])
    first = [transform(_sample())["image"] for _ in range(3)]
    transform.reseed([7, 1])
    second = [transform(_sample())["image"] for _ in range(3)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    rngs = {id(t.rng) for t in transform.transforms if hasattr(t, "rng")}
    assert len(rngs) == 1


def test_test_transform_is_resize_and_ignore() -> None:
    sample = _sample(30, 50)
    sample["human_parts"] = np.zeros((30, 50), np.float32)
    out = transforms.test_transform(16)(sample)
    expected = Compose([transforms.Resize(16), AddIgnoreRegions()])(sample)
    for key in ("image", "saliency", "semseg", "normals"):
        np.testing.assert_array_equal(out[key], expected[key])
    assert np.all(out["human_parts"] == IGNORE_INDEX)
