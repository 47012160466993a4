"""Procedural materials of the scene renderer: solid textures evaluated at local hit points.

A texture is a function of the 3D point in the primitive's local frame, so it moves and turns
with the object and needs no surface parametrisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURES = ("plain", "checker", "stripes", "noise", "gradient")

# Side of the periodic lattice of random values behind the "noise" texture.
_LATTICE = 8


@dataclass
class Material:
    """Surface appearance of a primitive.

    Attributes:
        texture: One of TEXTURES.
        colors: (2, 3) RGB albedos in [0, 1] that the texture mixes.
        scale: Feature size of the texture in scene units: checker cell, stripe period and
            noise cell. A gradient spans eight times this length.
        direction: (3,) unit vector along which stripes and gradients vary, local frame.
        lattice: (_LATTICE,) * 3 random values for "noise", None otherwise.
        sharp: Stripes switch colour abruptly when True and follow a sine when False.
        specular: Weight of the Blinn-Phong highlight, 0 for matte surfaces.
        shininess: Blinn-Phong exponent.
    """

    texture: str
    colors: np.ndarray
    scale: float
    direction: np.ndarray
    lattice: np.ndarray | None = None
    sharp: bool = True
    specular: float = 0.0
    shininess: float = 16.0


def random_color(rng: np.random.Generator) -> np.ndarray:
    """Draw a saturated-to-muted RGB colour by mixing a random hue with grey."""
    hue = rng.uniform(0.0, 1.0, 3)
    grey = rng.uniform(0.2, 0.8)
    saturation = rng.uniform(0.2, 1.0)
    return np.clip(saturation * hue + (1.0 - saturation) * grey, 0.03, 0.97)


def sample_material(
    rng: np.random.Generator,
    textured_probability: float,
    scale_range: tuple[float, float] = (0.08, 0.4),
    base_color: np.ndarray | None = None,
) -> Material:
    """Draw a material, "plain" with probability 1 - textured_probability."""
    textured = rng.uniform() < textured_probability
    texture = str(rng.choice(TEXTURES[1:])) if textured else "plain"
    first = random_color(rng) if base_color is None else base_color
    second = random_color(rng)
    direction = rng.normal(size=3)
    material = Material(
        texture=texture,
        colors=np.stack([first, second]),
        scale=float(rng.uniform(*scale_range)),
        direction=direction / np.linalg.norm(direction),
        sharp=bool(rng.uniform() < 0.5),
        specular=float(rng.uniform(0.0, 0.5) if rng.uniform() < 0.5 else 0.0),
        shininess=float(rng.uniform(8.0, 64.0)),
    )
    if texture == "noise":
        material.lattice = rng.uniform(0.0, 1.0, (_LATTICE,) * 3)
    return material


def _value_noise(lattice: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinearly interpolate a periodic lattice at points (M, 3) given in cell units."""
    base = np.floor(points)
    frac = points - base
    frac = frac * frac * (3.0 - 2.0 * frac)  # smoothstep, so cell borders do not show
    base = base.astype(np.int64) % _LATTICE
    result = np.zeros(len(points))
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        index = (base + offset) % _LATTICE
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        result += weight * lattice[index[:, 0], index[:, 1], index[:, 2]]
    return result


def albedo(material: Material, points: np.ndarray) -> np.ndarray:
    """Return RGB albedos (M, 3) in [0, 1] of `material` at local points (M, 3)."""
    if material.texture == "plain":
        return np.broadcast_to(material.colors[0], points.shape).copy()
    if material.texture == "checker":
        cells = np.floor(points / material.scale).astype(np.int64)
        mix = (cells.sum(axis=1) % 2).astype(float)
    elif material.texture == "stripes":
        phase = 2.0 * np.pi * (points @ material.direction) / material.scale
        wave = np.sin(phase)
        mix = (wave > 0.0).astype(float) if material.sharp else 0.5 + 0.5 * wave
    elif material.texture == "noise":
        assert material.lattice is not None, "a noise material needs a lattice"
        cells = points / material.scale
        coarse = _value_noise(material.lattice, cells)
        fine = _value_noise(material.lattice, 2.0 * cells)
        mix = (2.0 * coarse + fine) / 3.0
    elif material.texture == "gradient":
        half_extent = 4.0 * material.scale
        mix = np.clip(0.5 + 0.5 * (points @ material.direction) / half_extent, 0.0, 1.0)
    else:
        raise ValueError(f"invalid texture {material.texture!r}; valid textures: {list(TEXTURES)}")
    return material.colors[0] + mix[:, None] * (material.colors[1] - material.colors[0])
