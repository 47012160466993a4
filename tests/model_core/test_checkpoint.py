import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer

from model_core.calibration import calibrate, mean_flops_ratio
from model_core.checkpoint import (
    MAX_CLASSES,
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model_core.encoder import BackboneWeightsError, load_backbone_weights
from model_core.model import AdaMTL
from model_core.predictor import InvalidRequestError, Predictor
from model_core.presets import HUMAN_PARTS_CLASSES, TASKS, get_preset
from tests.model_core.conftest import make_images, make_model, with_metadata


def test_checkpoint_round_trip(tmp_path, calibrated_model):
    path = save_checkpoint(
        calibrated_model, tmp_path / "model.safetensors", provenance={"seed": 3}, metrics={"x": 1.5}
    )
    model, metadata = load_checkpoint(path)
    assert metadata["provenance"] == {"seed": 3}
    assert metadata["metrics"] == {"x": 1.5}
    assert metadata["config"]["name"] == "tiny"
    assert model.calibration == calibrated_model.calibration
    assert not model.training
    images = make_images(2)
    with torch.no_grad():
        expected = calibrated_model(images, 0.5)
        actual = model(images, 0.5)
    for task in TASKS:
        assert torch.equal(actual.outputs[task], expected.outputs[task])
    assert torch.equal(actual.stats.flops, expected.stats.flops)


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {re.escape(str(path))}"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(tmp_path):
    path = save_checkpoint(make_model(), tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_checkpoint_without_metadata_is_reported(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="has no 'adamtl' metadata"):
        load_checkpoint(path)


def test_mismatched_tensors_are_reported(tmp_path):
    model = make_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("heads.semseg.decoder.1.weight")
    state["extra.weight"] = torch.zeros(1)
    metadata = json.loads(json.dumps({"format": "adamtl/1", "config": model.config.to_dict()}))
    path = tmp_path / "mismatch.safetensors"
    save_file(state, str(path), metadata={"adamtl": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match="missing tensors .*heads.semseg.decoder.1.weight"):
        load_checkpoint(path)


def test_wrong_shapes_are_reported(tmp_path):
    small = make_model()
    path = save_checkpoint(small, tmp_path / "model.safetensors")
    metadata = read_metadata(path)
    metadata["config"]["decoder_width"] = 24
    state = {k: v.contiguous() for k, v in small.state_dict().items()}
    save_file(state, str(path), metadata={"adamtl": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(path)


def test_invalid_configuration_is_reported(tmp_path):
    path = save_checkpoint(make_model(), tmp_path / "model.safetensors")
    metadata = read_metadata(path)
    metadata["config"]["tasks"] = ["depth"]
    state = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    save_file(state, str(path), metadata={"adamtl": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match="invalid model configuration.*invalid tasks"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    save_checkpoint(make_model(), path)
    return path.read_bytes()


def _set_classes(task: str, names):
    def change(metadata):
        metadata["config"]["classes"][task] = names

    return change


def _set_config(key: str, value):
    def change(metadata):
        metadata["config"][key] = value

    return change


# (change to the metadata, field the message must name, part of the message)
INVALID_METADATA = {
    "300 classes": (
        _set_classes("semseg", [f"class{i}" for i in range(300)]),
        "config.classes.semseg",
        "lists 300 classes for task 'semseg', but at most 256 classes are supported",
    ),
    "class names not strings": (
        _set_classes("semseg", list(range(9))),
        "config.classes.semseg",
        "item 0 is the int 0",
    ),
    "class list a string": (
        _set_classes("semseg", "abcdefghi"),
        "config.classes.semseg",
        "got the string 'abcdefghi'",
    ),
    "empty class list": (
        _set_classes("human_parts", []),
        "config.classes.human_parts",
        "got an empty list",
    ),
    "one class": (
        _set_classes("semseg", ["floor"]),
        "config.classes.semseg",
        "at least 2 class names for task 'semseg', got 1",
    ),
    "empty class name": (
        _set_classes("semseg", ["floor", ""]),
        "config.classes.semseg",
        "item 1 is the string ''",
    ),
    "duplicate class names": (
        _set_classes("semseg", ["floor", "wall", "floor"]),
        "config.classes.semseg",
        "'floor' appears more than once",
    ),
    "config null": (
        lambda metadata: metadata.update(config=None),
        "config",
        "must be an object with the model configuration, as save_checkpoint writes it, got null",
    ),
    "config missing": (
        lambda metadata: metadata.pop("config"),
        "config",
        "is missing",
    ),
    "classes a list": (
        _set_config("classes", []),
        "config.classes",
        "must be an object that maps task names to class lists",
    ),
    "duplicate tasks": (
        _set_config("tasks", ["saliency", "semseg", "normals", "semseg"]),
        "config.tasks",
        "'semseg' appears more than once",
    ),
    "tasks a string": (
        _set_config("tasks", "semseg"),
        "config.tasks",
        "got the string 'semseg'",
    ),
}


@pytest.mark.parametrize("case", list(INVALID_METADATA))
def test_invalid_metadata_field_is_reported(checkpoint_bytes, tmp_path, case):
    change, field, problem = INVALID_METADATA[case]
    path = tmp_path / "invalid.safetensors"
    path.write_bytes(with_metadata(checkpoint_bytes, change))

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert f"checkpoint {path} has an invalid model configuration" in message
    assert f"metadata field '{field}'" in message
    assert problem in message


def _semseg_classes(count: int) -> dict[str, tuple[str, ...]]:
    names = tuple(f"class{i}" for i in range(count))
    return {"human_parts": HUMAN_PARTS_CLASSES, "semseg": names}


def test_too_many_classes_rejected_at_build():
    # Before any training, so no trained model ends up in a checkpoint that cannot load.
    with pytest.raises(ValueError) as raised:
        make_model(classes=_semseg_classes(MAX_CLASSES + 1))

    message = str(raised.value)
    assert f"task 'semseg' has {MAX_CLASSES + 1} classes" in message
    assert f"at most {MAX_CLASSES} are supported" in message


def test_max_classes_predicts_last_label(tmp_path):
    model = make_model(classes=_semseg_classes(MAX_CLASSES))
    with torch.no_grad():
        # Make the last class win at every pixel, so the label map must contain index 255.
        model.heads["semseg"].decoder[1].bias[MAX_CLASSES - 1] = 1000.0
    path = save_checkpoint(model, tmp_path / "widest.safetensors")

    predictor = Predictor(load_checkpoint(path)[0])
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    (result,) = predictor.predict([image], 1.0, ["semseg"])

    assert len(predictor.classes["semseg"]) == MAX_CLASSES
    assert result.maps["semseg"].dtype == np.uint8
    assert (result.maps["semseg"] == MAX_CLASSES - 1).all()


def _save_state(path, model: AdaMTL, state: dict[str, torch.Tensor]) -> None:
    """Write `state` with the metadata of `model`, as an export with other dtypes would."""
    metadata = {"format": "adamtl/1", "config": model.config.to_dict()}
    save_file(state, str(path), metadata={"adamtl": json.dumps(metadata)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_are_cast_on_load(tmp_path, dtype):
    model = make_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "heads.semseg.decoder.1.weight"
    state[name] = state[name].to(dtype)
    path = tmp_path / "cast.safetensors"
    _save_state(path, model, state)

    loaded, _ = load_checkpoint(path)

    weight = loaded.state_dict()[name]
    assert weight.dtype == torch.float32
    assert torch.equal(weight, state[name].to(torch.float32))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("heads.semseg.decoder.1.weight", torch.int32),
        ("heads.semseg.decoder.1.weight", torch.bool),
        ("heads.semseg.fuse.1.num_batches_tracked", torch.int32),
        ("heads.semseg.fuse.1.num_batches_tracked", torch.float32),
    ],
    ids=["int32 weight", "bool weight", "int32 counter", "float32 counter"],
)
def test_wrong_dtypes_are_reported(tmp_path, name, dtype):
    model = make_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state[name] = state[name].to(dtype)
    path = tmp_path / "dtype.safetensors"
    _save_state(path, model, state)

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert f"checkpoint {path} has tensors of the wrong dtype" in message
    assert f"{name} {dtype} != {model.state_dict()[name].dtype}" in message


def test_float64_overflow_is_reported(tmp_path):
    model = make_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "heads.semseg.decoder.1.weight"
    state[name] = state[name].to(torch.float64)
    state[name][0, 0, 0, 0] = 1e300
    path = tmp_path / "overflow.safetensors"
    _save_state(path, model, state)

    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)

    message = str(raised.value)
    assert f"checkpoint {path} has NaN or infinite values" in message
    assert name in message


def test_calibration_matches_budget_on_its_images():
    model = make_model(seed=4)
    images = make_images(8, seed=8)
    table = calibrate(model, images, budgets=[0.4, 0.6, 0.8])
    assert table["budgets"] == [0.4, 0.6, 0.8]
    for budget in (0.4, 0.6, 0.8):
        assert mean_flops_ratio(model, images, budget) == pytest.approx(budget, abs=0.03)


def test_calibration_grid_sorted_and_checked():
    model = make_model(seed=4)
    images = make_images(4, seed=8)
    table = calibrate(model, images, budgets=[0.8, 0.4, 0.8])
    assert table["budgets"] == [0.4, 0.8]
    assert table["offsets"][0] <= table["offsets"][1]
    for budgets in ([1.0], [0.1, 0.5], []):
        with pytest.raises(ValueError, match="calibration budgets"):
            calibrate(model, images, budgets=budgets)


def test_calibration_works_for_untrained_default_policy():
    torch.manual_seed(0)
    model = AdaMTL(get_preset("tiny")).eval()
    images = make_images(4, seed=2)
    calibrate(model, images, budgets=[0.5])
    assert mean_flops_ratio(model, images, 0.5) == pytest.approx(0.5, abs=0.03)


def _timm_swin(seed: int) -> SwinTransformer:
    torch.manual_seed(seed)
    config = get_preset("tiny")
    return SwinTransformer(
        img_size=config.img_size, patch_size=4, embed_dim=config.embed_dim, depths=config.depths,
        num_heads=config.num_heads, window_size=config.window_size, num_classes=10,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_weights_load_from_timm_layout(tmp_path, suffix):
    source = _timm_swin(seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"swin{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = make_model()
    load_backbone_weights(model.encoder, path)
    for name, value in source.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(model.encoder.state_dict()[name], value), name


def test_backbone_weights_load_from_original_swin_layout(tmp_path):
    source = _timm_swin(seed=6)
    # The original Swin release puts patch merging at the end of the previous stage.
    original = {}
    for name, value in source.state_dict().items():
        match = re.match(r"layers\.(\d+)\.downsample\.(.*)", name)
        if match:
            name = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        original[name.replace("head.fc.", "head.")] = value
    path = tmp_path / "swin_original.pth"
    torch.save({"model": original}, path)
    model = make_model()
    load_backbone_weights(model.encoder, path)
    expected = source.state_dict()["layers.2.downsample.reduction.weight"]
    assert torch.equal(model.encoder.state_dict()["layers.2.downsample.reduction.weight"], expected)


def test_backbone_weights_mismatch_names_keys(tmp_path):
    state = {k: v for k, v in _timm_swin(seed=1).state_dict().items()}
    state.pop("layers.0.blocks.0.attn.qkv.weight")
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(
        BackboneWeightsError, match=r"missing keys \['layers.0.blocks.0.attn.qkv.weight'\]"
    ):
        load_backbone_weights(make_model().encoder, path)


def test_backbone_weights_missing_file(tmp_path):
    with pytest.raises(BackboneWeightsError, match="not found"):
        load_backbone_weights(make_model().encoder, tmp_path / "none.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_weights_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"not a state dict")
    with pytest.raises(BackboneWeightsError) as raised:
        load_backbone_weights(make_model().encoder, path)
    message = str(raised.value)
    assert f"cannot read backbone weights {path} (" in message
    assert "complete .safetensors, .pth or .bin file" in message


def test_predictor_returns_maps_at_original_size(calibrated_model):
    predictor = Predictor(calibrated_model)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)),
        rng.integers(0, 255, (120, 33, 3), dtype=np.uint8),
    ]
    results = predictor.predict(images, [0.5, 1.0], [["semseg", "normals"], list(TASKS)])
    assert set(results[0].maps) == {"semseg", "normals"}
    assert results[0].maps["semseg"].shape == (50, 90)
    assert results[0].maps["normals"].shape == (50, 90, 3)
    assert results[1].maps["saliency"].shape == (120, 33)
    assert results[1].maps["human_parts"].dtype == np.uint8
    assert results[1].maps["semseg"].max() < len(predictor.classes["semseg"])
    norms = np.linalg.norm(results[1].maps["normals"], axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    assert results[1].stats["flops_ratio"] == 1.0
    assert results[0].stats["flops_ratio"] < 1.0
    assert results[0].stats["tasks"] == ["semseg", "normals"]


def test_predictor_output_sizes(calibrated_model):
    predictor = Predictor(calibrated_model)
    image = np.random.default_rng(2).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    own, larger = predictor.predict(
        [image, image], 0.6, ["semseg", "saliency"], [(40, 60), (80, 120)]
    )
    assert own.maps["semseg"].shape == (40, 60)
    assert larger.maps["semseg"].shape == (80, 120)
    assert larger.maps["saliency"].shape == (80, 120)
    # Same input, so the larger labels are the smaller ones scaled by 2 (nearest).
    assert own.stats["flops"] == larger.stats["flops"]
    np.testing.assert_array_equal(larger.maps["semseg"][::2, ::2], own.maps["semseg"])
    with pytest.raises(ValueError, match="one \\(height, width\\)"):
        predictor.predict([image], 0.6, None, [(40, 60), (40, 60)])
    with pytest.raises(ValueError, match="positive sides"):
        predictor.predict([image], 0.6, None, [(0, 60)])


def test_predictor_infer_then_postprocess(calibrated_model):
    predictor = Predictor(calibrated_model)
    image = np.random.default_rng(3).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    (heads,) = predictor.infer([image], 0.6, ["semseg", "normals"])
    head_size = tuple(calibrated_model.head_size)
    assert sorted(heads.outputs) == ["normals", "semseg"]
    assert heads.outputs["normals"].shape == (3, *head_size)
    assert heads.stats["tasks"] == ["semseg", "normals"]
    (full,) = predictor.predict([image], 0.6, ["semseg", "normals"])
    assert heads.stats["flops"] == full.stats["flops"]
    labels = predictor.postprocess("semseg", heads.outputs["semseg"], 40, 60)
    np.testing.assert_array_equal(labels, full.maps["semseg"])


def test_predictor_batch_equals_single_requests(calibrated_model):
    predictor = Predictor(calibrated_model)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64 + 8 * i, 70, 3), dtype=np.uint8) for i in range(3)]
    budgets = [0.4, 0.8, 1.0]
    batched = predictor.predict(images, budgets)
    for image, budget, result in zip(images, budgets, batched, strict=True):
        single = predictor.predict([image], budget)[0]
        assert single.stats["flops"] == pytest.approx(result.stats["flops"])
        np.testing.assert_array_equal(single.maps["semseg"], result.maps["semseg"])
        np.testing.assert_allclose(single.maps["saliency"], result.maps["saliency"], atol=1e-4)


def test_predictor_validate_rejects_bad_requests(calibrated_model):
    predictor = Predictor(calibrated_model)
    with pytest.raises(InvalidRequestError, match="invalid budget 0.1"):
        predictor.validate(0.1, None)
    with pytest.raises(InvalidRequestError, match="unknown task 'edges'"):
        predictor.validate(0.5, ["edges"])
    predictor.validate(0.5, ["semseg"])


def test_predictor_rejects_non_rgb_arrays(calibrated_model):
    predictor = Predictor(calibrated_model)
    with pytest.raises(ValueError, match="expected an RGB PIL image or a uint8"):
        predictor.predict([np.zeros((10, 10), dtype=np.uint8)])


def test_task_set_tables_track_subset_budgets(tmp_path):
    model = make_model(seed=4)
    images = make_images(8, seed=8)
    calibrate(model, images, budgets=[0.5, 0.7], task_sets=[["normals", "semseg"]])
    assert set(model.calibration["task_sets"]) == {"semseg,normals"}
    for budget in (0.5, 0.7):
        subset = mean_flops_ratio(model, images, budget, tasks=["semseg", "normals"])
        assert subset == pytest.approx(budget, abs=0.03)
    without_table = dict(model.calibration, task_sets={})
    saved, model.calibration = model.calibration, without_table
    assert mean_flops_ratio(model, images, 0.5, tasks=["semseg", "normals"]) != pytest.approx(
        0.5, abs=0.005
    )
    model.calibration = saved
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    loaded, _ = load_checkpoint(path)
    assert loaded.calibration["task_sets"] == model.calibration["task_sets"]


def test_invalid_task_set_table_is_reported(tmp_path):
    model = make_model()
    model.calibration = {
        "budgets": [0.5],
        "offsets": [0.0],
        "task_sets": {"semseg": {"budgets": [0.5], "offsets": [float("nan")]}},
    }
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="invalid calibration table"):
        load_checkpoint(path)
