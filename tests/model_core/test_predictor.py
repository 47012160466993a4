import pytest
import torch

from model_core.predictor import first_max_index


@pytest.mark.parametrize("channels", [1, 2, 9, 21])
def test_first_max_index_equals_argmax(channels):
    generator = torch.Generator().manual_seed(channels)
    # Small integers make many ties, where argmax returns the first largest channel.
    scores = torch.randint(0, 4, (channels, 17, 23), generator=generator).float()
    index = first_max_index(scores)
    assert index.dtype == torch.uint8
    assert torch.equal(index.long(), scores.argmax(0))


def test_first_max_index_above_256_channels():
    scores = torch.zeros(300, 2, 3)
    scores[280, 1, 2] = 1.0
    index = first_max_index(scores)
    assert index.dtype == torch.int64
    assert torch.equal(index, scores.argmax(0))


def test_first_max_index_nan_like_argmax():
    nan = float("nan")
    scores = torch.tensor(
        [
            [[1.0, nan, 3.0, -float("inf")]],
            [[nan, 2.0, nan, -float("inf")]],
            [[2.0, nan, 1.0, -float("inf")]],
        ]
    )
    assert torch.equal(first_max_index(scores).long(), scores.argmax(0))
