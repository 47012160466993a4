import json
import struct

import pytest
import torch

from model_core.calibration import calibrate
from model_core.model import AdaMTL
from model_core.presets import get_preset


def make_model(seed: int = 0, **overrides) -> AdaMTL:
    torch.manual_seed(seed)
    model = AdaMTL(get_preset("tiny", **overrides)).eval()
    # Spread the policy's logits so that different images keep different tokens.
    with torch.no_grad():
        for policy in model.policies:
            for name in ("block_out", "token_out"):
                layer = getattr(policy, name, None)
                if layer is not None:
                    layer.weight.normal_(std=1.0)
                    layer.bias.fill_(0.5)
    return model


def make_images(count: int, seed: int = 1, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def calibrated_model() -> AdaMTL:
    model = make_model()
    calibrate(model, make_images(8, seed=7), budgets=[0.3, 0.5, 0.7, 0.9])
    return model


def with_metadata(raw: bytes, change) -> bytes:
    """Return safetensors bytes `raw` with `change` applied to the adamtl metadata dict."""
    header_size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_size])
    metadata = json.loads(header["__metadata__"]["adamtl"])
    change(metadata)
    header["__metadata__"] = {"adamtl": json.dumps(metadata)}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_size :]
