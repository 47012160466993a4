"""PASCAL-Context in the multi-task layout of the dense-prediction literature ("PASCAL-MT").

This reads the folder that the archives PASCAL_MT.tgz (ASTMT, MTI-Net, AdaMTL) and
PASCALContext.tar.gz (ATRC, InvPT) both unpack to, with paths relative to the root:

    JPEGImages/<id>.jpg                   RGB image
    ImageSets/Context/{train,val}.txt     one image id per line (4,998 and 5,105 ids)
    semseg/VOC12/<id>.png                 21-class index PNG, preferred where it exists,
    semseg/pascal-context/<id>.png        otherwise this one; 255 is ignored
    human_parts/<id>.mat                  PASCAL-Part annotation (variable "anno")
    normals_distill/<id>.png              RGB PNG, normal = 2 * value / 255 - 1
    sal_distill/<id>.png                  grey PNG, salient where value / 255 > 0.5
    pascal-context/trainval/<id>.mat      459-class PASCAL-Context "LabelMap" (values 1 to 459)

Only the files of the enabled tasks must exist, and the constructor checks them for every id.
The loader writes nothing under the root, so the dataset may be read-only. The reference
loaders write a cache of object classes per image (ImageSets/Parts/<split>.txt) into the
dataset folder to find images with people. This loader reads ImageSets/Parts not at all:
it derives `has_people` from the PASCAL-Part file while decoding each sample, which it does
anyway, so no cache is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image

from model_core.presets import HUMAN_PARTS_CLASSES, IGNORE_INDEX, TASKS
from training.datasets.common import to_tensor_sample

SPLITS: tuple[str, ...] = ("train", "val")

# VOC class index of "person" in PASCAL-Part's class_ind field.
PERSON_CLASS_INDEX = 15

# PASCAL-Part person part names grouped into the six parts of the literature. The group id is
# the index into HUMAN_PARTS_CLASSES, where 0 is background.
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(
        ("hair", "head", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "mouth", "nose"), 1
    ),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}

# PASCAL-Context (459-class) ids whose distilled normals count as valid: the classes whose
# names are also NYUv2 class names, without "unknown", plus "tvmonitor" (427). The reference
# loaders derive this set of 170 ids from context_classes.json and nyu_classes.json.
NORMALS_VALID_CLASSES: frozenset[int] = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))  # fmt: skip
assert len(NORMALS_VALID_CLASSES) == 170

_NORMALS_VALID_ARRAY = np.array(sorted(NORMALS_VALID_CLASSES))

assert len(HUMAN_PARTS_CLASSES) == 1 + max(PART_GROUPS.values())

__all__ = [
    "NORMALS_VALID_CLASSES",
    "PART_GROUPS",
    "PascalContextMT",
    "decode_human_parts",
    "decode_normals",
    "decode_saliency",
]


# Decoders of the individual annotation files. Each returns the raw-sample array of
# `training.datasets.common` at the image's size.


def _mat_field(record: np.void | np.ndarray, name: str, path: Path) -> Any:
    try:
        return record[name]
    except (KeyError, ValueError, IndexError) as error:
        raise ValueError(
            f"invalid PASCAL-Part file {path}: missing struct field {name!r}"
        ) from error


def _load_mat(path: Path) -> dict[str, Any]:
    """Read a MATLAB file, raising ValueError that names `path` when it is not readable."""
    try:
        return scipy.io.loadmat(path)
    # scipy 1.17 raises any of these on a truncated or corrupt file, depending on where it ends.
    except (
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        EOFError,
        scipy.io.matlab.MatReadError,
    ) as error:
        raise ValueError(
            f"invalid MATLAB file {path}: {error}; it may be truncated or corrupt, so extract it "
            "again from the dataset archive"
        ) from error


def decode_human_parts(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Decode a PASCAL-Part `.mat` file into the six-part map of the literature.

    Objects and their parts are painted in file order, so later masks overwrite earlier ones.
    Only person objects (class_ind 15) with a parts list are used.

    Args:
        path: PASCAL-Part annotation with variable "anno" (struct with fields "imname" and
            "objects"; each object has "class", "class_ind", "mask" and "parts", each part
            "part_name" and "mask").
        size: (H, W) of the image; every mask must have this shape.

    Returns:
        (parts, has_people). parts is float32 (H, W) with values 0 to 6, or entirely
        IGNORE_INDEX if no part pixel was painted. has_people is True iff some pixel was
        painted, i.e. the image shows at least one person with annotated parts.
    """
    path = Path(path)
    mat = _load_mat(path)
    if "anno" not in mat:
        raise ValueError(f"invalid PASCAL-Part file {path}: no variable 'anno'")
    anno = mat["anno"][0, 0]
    objects = _mat_field(anno, "objects", path)

    parts = np.zeros(size, dtype=np.float32)
    for obj in objects.ravel():
        class_index = int(np.asarray(_mat_field(obj, "class_ind", path)).ravel()[0])
        obj_parts = _mat_field(obj, "parts", path)
        if class_index != PERSON_CLASS_INDEX or obj_parts.size == 0:
            continue
        for part in obj_parts.ravel():
            name = str(np.asarray(_mat_field(part, "part_name", path)).ravel()[0])
            if name not in PART_GROUPS:
                raise ValueError(
                    f"invalid PASCAL-Part file {path}: unknown person part {name!r}; "
                    f"known parts: {sorted(PART_GROUPS)}"
                )
            mask = np.asarray(_mat_field(part, "mask", path))
            if mask.shape != size:
                raise ValueError(
                    f"invalid PASCAL-Part file {path}: part mask {mask.shape} differs from "
                    f"the image size {size}"
                )
            parts[mask.astype(bool)] = PART_GROUPS[name]

    has_people = bool(parts.any())
    if not has_people:
        parts.fill(IGNORE_INDEX)
    return parts, has_people


def decode_normals(png_path: str | Path, label_map_path: str | Path) -> np.ndarray:
    """Decode a distilled normals PNG and mask it with the PASCAL-Context classes.

    Each RGB value v becomes 2 * v / 255 - 1 and is normalised to unit length. Pixels whose
    459-class label is not in NORMALS_VALID_CLASSES are IGNORE_INDEX in all three channels.

    Returns:
        float32 (H, W, 3).
    """
    png_path, label_map_path = Path(png_path), Path(label_map_path)
    with Image.open(png_path) as image:
        if image.mode != "RGB":
            raise ValueError(f"invalid normals PNG {png_path}: mode {image.mode}, expected RGB")
        values = np.asarray(image, dtype=np.float32)
    mat = _load_mat(label_map_path)
    if "LabelMap" not in mat:
        raise ValueError(f"invalid PASCAL-Context file {label_map_path}: no variable 'LabelMap'")
    label_map = np.asarray(mat["LabelMap"])
    if label_map.shape != values.shape[:2]:
        raise ValueError(
            f"LabelMap {label_map.shape} of {label_map_path} differs from the normals PNG "
            f"{values.shape[:2]} of {png_path}"
        )

    vectors = values * (2.0 / 255.0) - 1.0
    # The smallest possible length is 1/255 per channel, so the division is safe.
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    valid = np.isin(label_map, _NORMALS_VALID_ARRAY)
    return np.where(valid[..., None], vectors, np.float32(IGNORE_INDEX)).astype(np.float32)


def decode_saliency(path: str | Path) -> np.ndarray:
    """Binarise a distilled saliency PNG at 0.5: float32 (H, W), 1 where value / 255 > 0.5."""
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    return (values > 127.5).astype(np.float32)


def _read_index_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"invalid label PNG {path}: mode {image.mode}, expected L or P")
        return np.asarray(image).astype(np.float32)


class PascalContextMT(torch.utils.data.Dataset):
    """PASCAL-Context with saliency, human parts, 21-class semseg and normals labels.

    Each item is the tensor sample of `training.datasets.common`: `transform` (if given) is
    applied to the raw numpy sample, and `to_tensor_sample` converts the result. Without a
    transform the maps keep the image's own size, so samples of different images cannot be
    stacked into one batch.

    meta["has_people"] is True iff the image has at least one person with annotated parts. It
    is False when "human_parts" is not among `tasks`, because the PASCAL-Part file is then
    not read. meta["complexity"] is None.

    Args:
        root: Dataset folder (the one that contains JPEGImages). It is only read.
        split: "train" or "val".
        tasks: Subset of TASKS to load.
        transform: Callable from raw sample to raw sample, e.g.
            `training.datasets.transforms.train_transform(size, rng)`.

    Raises:
        FileNotFoundError: A folder, split list or annotation file of an enabled task is
            missing; the message names the first missing path.
        ValueError: Invalid split or task names, or an empty split list.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        tasks: Sequence[str],
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"invalid split {split!r}: use one of {list(SPLITS)}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(
                f"invalid tasks {list(tasks)}: choose a non-empty subset of {list(TASKS)}"
            )
        self.root = Path(root)
        self.split = split
        self.tasks = tuple(tasks)
        self.transform = transform

        if not self.root.is_dir():
            raise FileNotFoundError(
                f"PASCAL-Context root {self.root} not found: expected the folder unpacked from "
                "PASCAL_MT.tgz, containing JPEGImages and ImageSets"
            )
        split_file = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(
                f"split list {split_file} not found: expected one image id per line"
            )
        try:
            lines = split_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(
                f"invalid split list {split_file}: not UTF-8 text ({error}); expected one image "
                "id per line"
            ) from None
        self.ids: list[str] = [line.strip() for line in lines]
        self.ids = [image_id for image_id in self.ids if image_id]
        if not self.ids:
            raise ValueError(f"split list {split_file} contains no image ids")
        self._check_files()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.raw_sample(index)
        if self.transform is not None:
            raw = self.transform(raw)
        return to_tensor_sample(raw)

    def __repr__(self) -> str:
        return (
            f"PascalContextMT(root={str(self.root)!r}, split={self.split!r}, "
            f"tasks={list(self.tasks)}, images={len(self)})"
        )

    def raw_sample(self, index: int) -> dict[str, Any]:
        """Read image `index` and its labels as a raw numpy sample at the original size."""
        image_id = self.ids[index]
        with Image.open(self._image_path(image_id)) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        size = rgb.shape[:2]
        sample: dict[str, Any] = {"image": rgb}
        has_people = False

        if "saliency" in self.tasks:
            sample["saliency"] = decode_saliency(self._saliency_path(image_id))
        if "human_parts" in self.tasks:
            sample["human_parts"], has_people = decode_human_parts(
                self._human_parts_path(image_id), size
            )
        if "semseg" in self.tasks:
            sample["semseg"] = _read_index_png(self._semseg_path(image_id))
        if "normals" in self.tasks:
            sample["normals"] = decode_normals(
                self._normals_path(image_id), self._label_map_path(image_id)
            )

        for key, value in sample.items():
            if value.shape[:2] != size:
                raise ValueError(
                    f"{key} label of image {image_id} has size {value.shape[:2]}, "
                    f"but the image has {size}"
                )
        sample["meta"] = {
            "id": image_id,
            "size": size,
            "has_people": has_people,
            "complexity": None,
        }
        return sample

    # Paths of the files of one image.

    def _image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def _saliency_path(self, image_id: str) -> Path:
        return self.root / "sal_distill" / f"{image_id}.png"

    def _human_parts_path(self, image_id: str) -> Path:
        return self.root / "human_parts" / f"{image_id}.mat"

    def _semseg_path(self, image_id: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{image_id}.png"
        if voc.is_file():
            return voc
        return self.root / "semseg" / "pascal-context" / f"{image_id}.png"

    def _normals_path(self, image_id: str) -> Path:
        return self.root / "normals_distill" / f"{image_id}.png"

    def _label_map_path(self, image_id: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{image_id}.mat"

    def _check_files(self) -> None:
        """Raise FileNotFoundError naming the first missing file of an enabled task."""
        expected: list[tuple[Callable[[str], Path], str]] = [
            (self._image_path, "an RGB JPEG image"),
        ]
        if "saliency" in self.tasks:
            expected.append((self._saliency_path, "a grey saliency PNG"))
        if "human_parts" in self.tasks:
            expected.append((self._human_parts_path, "a PASCAL-Part .mat file"))
        if "semseg" in self.tasks:
            expected.append((self._semseg_path, "a 21-class index PNG here or under semseg/VOC12"))
        if "normals" in self.tasks:
            expected.append((self._normals_path, "an RGB normals PNG"))
            expected.append((self._label_map_path, "a PASCAL-Context .mat file with 'LabelMap'"))

        for path_of, description in expected:
            missing = [i for i in self.ids if not path_of(i).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path_of(missing[0])} not found: expected {description} for every id of "
                    f"ImageSets/Context/{self.split}.txt ({len(missing)} of {len(self.ids)} "
                    "ids lack it)"
                )
