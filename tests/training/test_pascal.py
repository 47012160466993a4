"""PascalContextMT on a tiny dataset written in the PASCAL-MT on-disk layout."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from model_core.presets import IGNORE_INDEX
from training.datasets import transforms
from training.datasets.common import collate_samples
from training.datasets.pascal import NORMALS_VALID_CLASSES, PascalContextMT

PERSON_ID = "2008_000001"  # 48 x 64, one person with six parts and one bird
BIRD_ID = "2008_000002"  # 64 x 48, a bird only: no people
NO_PARTS_ID = "2009_000001"  # 40 x 40, a person without part annotation

# PASCAL-Context ids used in the LabelMaps.
CONTEXT_PERSON, CONTEXT_WALL, CONTEXT_SKY = 284, 440, 360


def _parts_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0))
    array = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for j, (name, mask) in enumerate(parts):
        array["part_name"][0, j] = name
        array["mask"][0, j] = mask.astype(np.uint8)
    return array


def _write_part_mat(path: Path, image_id: str, objects: list[tuple]) -> None:
    """Write a PASCAL-Part file with objects given as (class, class_ind, mask, [(part, mask)])."""
    fields = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    array = np.empty((1, len(objects)), dtype=fields)
    for i, (name, class_ind, mask, parts) in enumerate(objects):
        array["class"][0, i] = name
        array["class_ind"][0, i] = np.array([[class_ind]], dtype=np.uint8)
        array["mask"][0, i] = mask.astype(np.uint8)
        array["parts"][0, i] = _parts_struct(parts)
    anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno["imname"][0, 0] = image_id
    anno["objects"][0, 0] = array
    scipy.io.savemat(path, {"anno": anno})


def _box(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def _write_image(root: Path, image_id: str, shape: tuple[int, int]) -> None:
    height, width = shape
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=2)
    Image.fromarray(rgb.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", "JPEG")


def _write_common(
    root: Path,
    image_id: str,
    shape: tuple[int, int],
    semseg: np.ndarray,
    semseg_folder: str,
    normals_png: np.ndarray,
    label_map: np.ndarray,
    saliency_png: np.ndarray,
) -> None:
    _write_image(root, image_id, shape)
    Image.fromarray(semseg.astype(np.uint8), mode="L").save(
        root / "semseg" / semseg_folder / f"{image_id}.png"
    )
    Image.fromarray(normals_png.astype(np.uint8), mode="RGB").save(
        root / "normals_distill" / f"{image_id}.png"
    )
    scipy.io.savemat(
        root / "pascal-context" / "trainval" / f"{image_id}.mat",
        {"LabelMap": label_map.astype(np.uint16)},
    )
    Image.fromarray(saliency_png.astype(np.uint8), mode="L").save(
        root / "sal_distill" / f"{image_id}.png"
    )


def build_dataset(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Write three images in the PASCAL-MT layout and return the label arrays written."""
    for folder in (
        "JPEGImages",
        "ImageSets/Context",
        "semseg/VOC12",
        "semseg/pascal-context",
        "human_parts",
        "normals_distill",
        "sal_distill",
        "pascal-context/trainval",
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Context/train.txt").write_text(f"{PERSON_ID}\n{BIRD_ID}\n")
    (root / "ImageSets/Context/val.txt").write_text(f"{NO_PARTS_ID}\n")
    written: dict[str, dict[str, np.ndarray]] = {}

    # Person image: semseg from VOC12 with a 255 border strip, normals split left and right,
    # sky in the top rows (normals invalid), saliency with a soft value just below 0.5.
    shape = (48, 64)
    semseg = np.zeros(shape, np.uint8)
    semseg[10:40, 10:30] = 15
    semseg[5:15, 40:60] = 3
    semseg[:, 63] = 255
    normals_png = np.zeros((*shape, 3), np.uint8)
    normals_png[:, :32] = (128, 128, 255)
    normals_png[:, 32:] = (255, 128, 128)
    label_map = np.full(shape, CONTEXT_WALL, np.uint16)
    label_map[:8] = CONTEXT_SKY
    label_map[10:40, 10:30] = CONTEXT_PERSON
    saliency = np.zeros(shape, np.uint8)
    saliency[10:40, 10:30] = 255
    saliency[0:4, 0:4] = 127  # 127 / 255 < 0.5: not salient
    saliency[0:4, 4:8] = 128  # 128 / 255 > 0.5: salient
    _write_common(root, PERSON_ID, shape, semseg, "VOC12", normals_png, label_map, saliency)
    person = _box(shape, slice(10, 40), slice(10, 30))
    part_boxes = [
        ("hair", (slice(10, 12), slice(12, 28))),
        ("head", (slice(12, 16), slice(14, 26))),  # painted after hair: wins where they overlap
        ("torso", (slice(16, 26), slice(12, 28))),
        ("luarm", (slice(16, 20), slice(10, 12))),
        ("llarm", (slice(20, 26), slice(10, 12))),
        ("luleg", (slice(26, 33), slice(12, 20))),
        ("rfoot", (slice(33, 40), slice(12, 20))),
    ]
    parts = [(name, _box(shape, *box)) for name, box in part_boxes]
    bird = _box(shape, slice(5, 15), slice(40, 60))
    _write_part_mat(
        root / "human_parts" / f"{PERSON_ID}.mat",
        PERSON_ID,
        [("person", 15, person, parts), ("bird", 3, bird, [])],
    )
    written[PERSON_ID] = {"semseg": semseg, "label_map": label_map, "saliency": saliency}

    # Bird image: semseg from pascal-context, no people.
    shape = (64, 48)
    semseg = np.zeros(shape, np.uint8)
    semseg[20:30, 20:30] = 3
    normals_png = np.full((*shape, 3), (0, 128, 128), np.uint8)
    label_map = np.full(shape, CONTEXT_WALL, np.uint16)
    saliency = np.zeros(shape, np.uint8)
    saliency[20:30, 20:30] = 200
    _write_common(root, BIRD_ID, shape, semseg, "pascal-context", normals_png, label_map, saliency)
    _write_part_mat(
        root / "human_parts" / f"{BIRD_ID}.mat",
        BIRD_ID,
        [("bird", 3, _box(shape, slice(20, 30), slice(20, 30)), [])],
    )
    written[BIRD_ID] = {"semseg": semseg, "label_map": label_map, "saliency": saliency}

    # Val image: a person whose parts are not annotated.
    shape = (40, 40)
    semseg = np.full(shape, 15, np.uint8)
    normals_png = np.full((*shape, 3), (128, 255, 128), np.uint8)
    label_map = np.full(shape, CONTEXT_PERSON, np.uint16)
    saliency = np.full(shape, 255, np.uint8)
    _write_common(root, NO_PARTS_ID, shape, semseg, "VOC12", normals_png, label_map, saliency)
    _write_part_mat(
        root / "human_parts" / f"{NO_PARTS_ID}.mat",
        NO_PARTS_ID,
        [("person", 15, np.ones(shape, bool), [])],
    )
    return written


@pytest.fixture(scope="module")
def written_labels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("PASCAL_MT")
    return root, build_dataset(root)


@pytest.fixture(scope="module")
def pascal_root(written_labels: tuple[Path, dict]) -> Path:
    return written_labels[0]


ALL_TASKS = ("saliency", "human_parts", "semseg", "normals")


def test_pascal_length_and_ids(pascal_root: Path) -> None:
    train = PascalContextMT(pascal_root, "train", ALL_TASKS)
    val = PascalContextMT(pascal_root, "val", ALL_TASKS)
    assert len(train) == 2
    assert train.ids == [PERSON_ID, BIRD_ID]
    assert val.ids == [NO_PARTS_ID]


def test_pascal_raw_image_and_meta(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "train", ALL_TASKS).raw_sample(0)
    assert raw["image"].dtype == np.uint8
    assert raw["image"].shape == (48, 64, 3)
    assert raw["meta"] == {
        "id": PERSON_ID,
        "size": (48, 64),
        "has_people": True,
        "complexity": None,
    }


def test_pascal_semseg_values(written_labels: tuple[Path, dict]) -> None:
    root, written = written_labels
    dataset = PascalContextMT(root, "train", ("semseg",))
    for index, image_id in enumerate(dataset.ids):
        raw = dataset.raw_sample(index)
        assert raw["semseg"].dtype == np.float32
        np.testing.assert_array_equal(raw["semseg"], written[image_id]["semseg"])
    assert dataset.raw_sample(0)["semseg"][0, 63] == IGNORE_INDEX


def test_pascal_semseg_prefers_voc12(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    other = np.full((48, 64), 7, np.uint8)
    Image.fromarray(other, mode="L").save(tmp_path / "semseg/pascal-context" / f"{PERSON_ID}.png")
    raw = PascalContextMT(tmp_path, "train", ("semseg",)).raw_sample(0)
    assert raw["semseg"][20, 20] == 15

    (tmp_path / "semseg/VOC12" / f"{PERSON_ID}.png").unlink()
    raw = PascalContextMT(tmp_path, "train", ("semseg",)).raw_sample(0)
    assert np.all(raw["semseg"] == 7)


def test_pascal_human_parts_decoding(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "train", ("human_parts",)).raw_sample(0)
    expected = np.zeros((48, 64), np.float32)
    expected[10:12, 12:28] = 1  # hair
    expected[12:16, 14:26] = 1  # head
    expected[16:26, 12:28] = 2  # torso
    expected[16:20, 10:12] = 3  # left upper arm
    expected[20:26, 10:12] = 4  # left lower arm
    expected[26:33, 12:20] = 5  # left upper leg
    expected[33:40, 12:20] = 6  # right foot: lower leg group
    np.testing.assert_array_equal(raw["human_parts"], expected)
    assert raw["meta"]["has_people"] is True


def test_pascal_human_parts_without_people(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "train", ("human_parts",)).raw_sample(1)
    assert raw["human_parts"].shape == (64, 48)
    assert np.all(raw["human_parts"] == IGNORE_INDEX)
    assert raw["meta"]["has_people"] is False


def test_pascal_person_without_parts_ignored(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "val", ("human_parts",)).raw_sample(0)
    assert np.all(raw["human_parts"] == IGNORE_INDEX)
    assert raw["meta"]["has_people"] is False


def test_pascal_has_people_needs_parts_task(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "train", ("semseg",)).raw_sample(0)
    assert raw["meta"]["has_people"] is False
    assert "human_parts" not in raw


def test_pascal_normals_decoding(pascal_root: Path) -> None:
    raw = PascalContextMT(pascal_root, "train", ("normals",)).raw_sample(0)
    normals = raw["normals"]
    assert normals.shape == (48, 64, 3)
    assert normals.dtype == np.float32

    # Rows 0-7 are sky, which is not a valid normals class.
    assert np.all(normals[:8] == IGNORE_INDEX)

    # (128, 128, 255) decodes to (1/255, 1/255, 1) before normalisation.
    left = np.array([1.0, 1.0, 255.0]) / np.sqrt(1 + 1 + 255.0**2)
    right = np.array([255.0, 1.0, 1.0]) / np.sqrt(255.0**2 + 1 + 1)
    np.testing.assert_allclose(normals[8:, :32], np.broadcast_to(left, (40, 32, 3)), atol=1e-6)
    np.testing.assert_allclose(normals[8:, 32:], np.broadcast_to(right, (40, 32, 3)), atol=1e-6)

    raw = PascalContextMT(pascal_root, "train", ("normals",)).raw_sample(1)
    expected = np.array([-255.0, 1.0, 1.0]) / np.sqrt(255.0**2 + 2)
    np.testing.assert_allclose(raw["normals"], np.broadcast_to(expected, (64, 48, 3)), atol=1e-6)


def test_normals_valid_class_examples() -> None:
    for valid in (284, 440, 158, 68, 72, 368, 397, 59, 65, 113, 23, 34, 293, 427):
        assert valid in NORMALS_VALID_CLASSES
    for invalid in (360, 420, 187, 324, 189, 44, 445, 259, 431, 2, 25, 31, 45, 98, 207, 258):
        assert invalid not in NORMALS_VALID_CLASSES


def test_pascal_saliency_threshold(pascal_root: Path) -> None:
    dataset = PascalContextMT(pascal_root, "train", ("saliency",))
    raw = dataset.raw_sample(0)
    expected = np.zeros((48, 64), np.float32)
    expected[10:40, 10:30] = 1
    expected[0:4, 4:8] = 1
    np.testing.assert_array_equal(raw["saliency"], expected)

    raw = dataset.raw_sample(1)
    assert raw["saliency"].sum() == 100
    assert np.all(raw["saliency"][20:30, 20:30] == 1)


def test_pascal_tensor_sample(pascal_root: Path) -> None:
    dataset = PascalContextMT(pascal_root, "train", ALL_TASKS, transforms.test_transform(32))
    sample = dataset[0]
    assert sample["image"].shape == (3, 32, 32)
    assert sample["image"].dtype == torch.float32
    assert sample["saliency"].shape == (1, 32, 32)
    assert sample["human_parts"].dtype == torch.int64
    assert sample["semseg"].shape == (32, 32)
    assert sample["normals"].shape == (3, 32, 32)
    assert sample["meta"]["size"] == (48, 64)

    batch = collate_samples([dataset[0], dataset[1]])
    assert batch["semseg"].shape == (2, 32, 32)
    assert torch.all(batch["human_parts"][1] == IGNORE_INDEX)
    assert [m["has_people"] for m in batch["meta"]] == [True, False]


def test_pascal_train_transform_runs(pascal_root: Path) -> None:
    transform = transforms.train_transform(32, np.random.default_rng(0))
    dataset = PascalContextMT(pascal_root, "train", ALL_TASKS, transform)
    sample = dataset[0]
    valid = (sample["normals"] != IGNORE_INDEX).all(dim=0)
    lengths = sample["normals"].norm(dim=0)[valid]
    assert valid.any()
    torch.testing.assert_close(lengths, torch.ones_like(lengths))
    assert set(sample["semseg"].unique().tolist()) <= {0, 3, 15, IGNORE_INDEX}


def _tree_state(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_pascal_read_only_root(tmp_path: Path) -> None:
    """Load from a folder without write permission and check that nothing under it changed.

    A superuser ignores the permission bits, so the comparison of names and modification
    times is what catches a write in that case.
    """
    root = tmp_path / "PASCAL_MT"
    build_dataset(root)
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    before = _tree_state(root)
    for folder in folders:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        dataset = PascalContextMT(root, "train", ALL_TASKS, transforms.test_transform(32))
        samples = [dataset[i] for i in range(len(dataset))]
        after = _tree_state(root)
    finally:
        for folder in folders:
            folder.chmod(stat.S_IRWXU)
    assert samples[0]["meta"]["has_people"] is True
    assert samples[1]["meta"]["has_people"] is False
    assert after == before


def test_pascal_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        PascalContextMT(tmp_path / "absent", "train", ALL_TASKS)


def test_pascal_missing_split_list(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    (tmp_path / "ImageSets/Context/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Context/val\.txt"):
        PascalContextMT(tmp_path, "val", ALL_TASKS)


def test_pascal_missing_annotation(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    (tmp_path / "human_parts" / f"{BIRD_ID}.mat").unlink()
    with pytest.raises(FileNotFoundError, match=rf"human_parts/{BIRD_ID}\.mat.*PASCAL-Part"):
        PascalContextMT(tmp_path, "train", ALL_TASKS)
    # Tasks that do not need the file still load.
    assert len(PascalContextMT(tmp_path, "train", ("semseg", "normals"))) == 2


def test_pascal_missing_label_map(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    (tmp_path / "pascal-context/trainval" / f"{PERSON_ID}.mat").unlink()
    with pytest.raises(FileNotFoundError, match="LabelMap"):
        PascalContextMT(tmp_path, "train", ("normals",))


def test_pascal_invalid_part_file(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    scipy.io.savemat(tmp_path / "human_parts" / f"{PERSON_ID}.mat", {"annotation": np.ones(2)})
    dataset = PascalContextMT(tmp_path, "train", ("human_parts",))
    with pytest.raises(ValueError, match=r"invalid PASCAL-Part file .*no variable 'anno'"):
        dataset.raw_sample(0)


def test_pascal_invalid_arguments(pascal_root: Path) -> None:
    with pytest.raises(ValueError, match="invalid split"):
        PascalContextMT(pascal_root, "test", ALL_TASKS)
    with pytest.raises(ValueError, match="invalid tasks"):
        PascalContextMT(pascal_root, "train", ("depth",))


def test_pascal_truncated_mat_files(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    parts = tmp_path / "human_parts" / f"{PERSON_ID}.mat"
    label_map = tmp_path / "pascal-context/trainval" / f"{PERSON_ID}.mat"
    for path, tasks in ((parts, ("human_parts",)), (label_map, ("normals",))):
        path.write_bytes(path.read_bytes()[:40])
        dataset = PascalContextMT(tmp_path, "train", tasks)
        index = dataset.ids.index(PERSON_ID)
        with pytest.raises(ValueError, match=rf"invalid MATLAB file {re.escape(str(path))}"):
            dataset.raw_sample(index)


def test_pascal_split_list_not_text(tmp_path: Path) -> None:
    build_dataset(tmp_path)
    split_file = tmp_path / "ImageSets/Context/train.txt"
    split_file.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=r"invalid split list .*train\.txt: not UTF-8 text"):
        PascalContextMT(tmp_path, "train", ALL_TASKS)
