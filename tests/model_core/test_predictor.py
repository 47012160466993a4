import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_core.predictor import (
    POSTPROCESS_FIRST,
    Predictor,
    _resize_square,
    bilinear_resize,
)
from tests.model_core.conftest import make_model


@pytest.mark.parametrize(
    ("in_size", "out_size"),
    [((24, 24), (480, 640)), ((24, 24), (192, 192)), ((24, 30), (7, 5)), ((5, 5), (1, 1)),
     ((1, 1), (4, 3)), ((6, 9), (6, 9)), ((24, 24), (2, 20_000))],
)  # fmt: skip
def test_bilinear_resize_matches_interpolate(in_size, out_size):
    generator = torch.Generator().manual_seed(0)
    maps = torch.randn(3, *in_size, generator=generator)
    expected = F.interpolate(maps[None], size=out_size, mode="bilinear", align_corners=False)[0]
    resized = bilinear_resize(maps, out_size)
    assert resized.shape == expected.shape
    torch.testing.assert_close(resized, expected, atol=2e-5, rtol=1e-5)
    interleaved = bilinear_resize(maps, out_size, channels_last=True)
    assert interleaved.is_contiguous()
    torch.testing.assert_close(interleaved, expected.permute(1, 2, 0), atol=2e-5, rtol=1e-5)


def test_bilinear_resize_integer_map_matches_interpolate():
    maps = torch.full((1, 4, 4), 200, dtype=torch.uint8)
    expected = F.interpolate(maps[None], size=(6, 6), mode="bilinear", align_corners=False)[0]
    assert torch.equal(bilinear_resize(maps, (6, 6)), expected)


def test_bilinear_resize_weights_serve_normal_mode():
    maps = torch.randn(2, 4, 4)
    with torch.inference_mode():
        bilinear_resize(maps, (13, 11))  # caches the weights in inference mode
    grad_maps = maps.clone().requires_grad_()
    bilinear_resize(grad_maps, (13, 11)).sum().backward()
    assert grad_maps.grad is not None


@pytest.mark.parametrize("classes", [1, 2, 9, 21])
def test_label_map_is_argmax_of_resized_logits(classes):
    predictor = Predictor(make_model())
    generator = torch.Generator().manual_seed(classes)
    output = torch.randn(classes, 6, 6, generator=generator)
    side = predictor.input_size
    logits = F.interpolate(output[None], size=(side, side), mode="bilinear", align_corners=False)
    expected = F.interpolate(logits.argmax(1, keepdim=True).float(), size=(45, 70), mode="nearest")[
        0, 0
    ].to(torch.uint8)
    labels = predictor.resize_output("semseg", output, 45, 70)
    assert labels.dtype == torch.uint8
    # The separable resize rounds differently from F.interpolate in the last bits, which could
    # flip a pixel whose two best classes score within about 1e-6.
    assert (labels != expected).float().mean() < 0.001


@pytest.mark.parametrize("shape", [(1000, 50), (50, 1000), (400, 300)])
def test_resize_square_matches_one_call(shape):
    image = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(0)) * 255
    expected = F.interpolate(
        image, size=(64, 64), mode="bilinear", antialias=True, align_corners=False
    )
    assert torch.allclose(_resize_square(image, 64), expected, atol=1e-3)


def test_resize_square_thin_image_stays_small():
    # In one interpolate call this image needs a 1,000,000 x 192 x 3 intermediate (2.3 GB).
    image = torch.zeros(1, 3, 1_000_000, 1)
    assert _resize_square(image, 192).shape == (1, 3, 192, 192)


def test_infer_delivers_maps_early():
    predictor = Predictor(make_model())
    generator = torch.Generator().manual_seed(3)
    images = [
        (torch.rand(40 + 8 * index, 56, 3, generator=generator) * 255).to(torch.uint8).numpy()
        for index in range(3)
    ]
    budgets = [0.5, 1.0, 0.7]
    tasks = [["semseg", "normals"], ["saliency", "normals", "semseg"], ["normals", "human_parts"]]
    delivered = []
    results = predictor.infer(
        images, budgets, tasks, on_output=lambda *item: delivered.append(item)
    )
    plain = predictor.infer(images, budgets, tasks)

    expected = [(index, task) for index, result in enumerate(results) for task in result.outputs]
    assert sorted((index, task) for index, task, _ in delivered) == sorted(expected)
    for index, task, output in delivered:
        returned = results[index].outputs[task]
        assert output.data_ptr() == returned.data_ptr()
        assert torch.equal(output, returned)
        torch.testing.assert_close(output, plain[index].outputs[task], rtol=0, atol=0)
        assert results[index].stats == plain[index].stats
    # Every image asked for normals, so its head runs first and is delivered before the others.
    assert POSTPROCESS_FIRST[0] == "normals"
    assert [task for _, task, _ in delivered[:3]] == ["normals"] * 3


def test_resize_output_matches_postprocess():
    predictor = Predictor(make_model())
    generator = torch.Generator().manual_seed(5)
    image = (torch.rand(45, 70, 3, generator=generator) * 255).to(torch.uint8).numpy()
    [heads] = predictor.infer([image], [0.7], [list(predictor.tasks)])
    expected = {"saliency": (45, 70), "normals": (45, 70, 3)}
    for task, output in heads.outputs.items():
        resized = predictor.resize_output(task, output, 45, 70)
        array = predictor.postprocess(task, output, 45, 70)
        assert tuple(resized.shape) == expected.get(task, (45, 70))
        assert array.shape == tuple(resized.shape)
        assert torch.equal(torch.from_numpy(array), resized)
        if task == "normals":
            torch.testing.assert_close(resized.norm(dim=-1), torch.ones(45, 70))
        else:
            assert resized.dtype == (torch.float32 if task == "saliency" else torch.uint8)


def test_read_only_array_gives_no_warning():
    # torch warns once per process, so the check runs in a process of its own.
    code = (
        "import warnings, numpy as np\n"
        "from model_core.predictor import Predictor\n"
        "from tests.model_core.conftest import make_model\n"
        "image = np.zeros((20, 30, 3), np.uint8)\n"
        "image.flags.writeable = False\n"
        "warnings.simplefilter('error')\n"
        "Predictor(make_model()).predict([image])\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
