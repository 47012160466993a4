"""Shading, sensor effects, label maps and the complexity score of a procedural scene.

Labels come from the same pixel-centre rays as the shading, before noise, blur and JPEG
touch the image, so every label is exact for the surface under the pixel centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from model_core.presets import IGNORE_INDEX
from training.datasets.scene_geometry import RayHits, cast_rays, group_pixels
from training.datasets.scene_layout import PERSON, Scene
from training.datasets.scene_texture import albedo

# A thing counts as visible when at least this fraction of the image shows it.
VISIBLE_FRACTION = 0.001
# Saliency rule: people showing at least PERSON_SALIENT_FRACTION of the image are salient, and
# so are the SALIENT_OBJECTS nearest objects (median depth of their visible pixels) among
# those showing at least OBJECT_SALIENT_FRACTION of the image.
PERSON_SALIENT_FRACTION = 0.005
OBJECT_SALIENT_FRACTION = 0.015
SALIENT_OBJECTS = 3
# Values at which each term of the complexity score saturates at 1 (see `complexity_score`).
VISIBLE_SATURATION = 12
OCCLUSION_SATURATION = 0.3
TEXTURE_SATURATION = 0.04


@dataclass
class RenderedScene:
    """A rendered image with its label maps, all (size, size) in row-major pixel order.

    Attributes:
        image: uint8 (S, S, 3) RGB after shading, sensor noise and blur (JPEG is applied when
            the image is written, with `jpeg_quality`).
        jpeg_quality: JPEG quality (40 to 95) drawn for this image.
        semseg: uint8 (S, S) index into SCENE_SEMSEG_CLASSES.
        human_parts: uint8 (S, S) part 0 to 6; all IGNORE_INDEX when no person is visible.
        normals: float32 (S, S, 3) unit camera-space normals (x right, y up, z to the camera).
        saliency: uint8 (S, S) 1 on salient things, 0 elsewhere.
        depth: float32 (S, S) distance along each pixel ray to the surface, scene units.
        visible_things: Objects and people that show at least VISIBLE_FRACTION of the image.
        occlusion: Fraction of the things' silhouette pixels covered by other things.
        texture_energy: Mean absolute luminance difference between neighbouring pixels of
            the shaded image before noise and blur, luminance in [0, 1].
        complexity: Score in [0, 1] combining the three values above.
    """

    image: np.ndarray
    jpeg_quality: int
    semseg: np.ndarray
    human_parts: np.ndarray
    normals: np.ndarray
    saliency: np.ndarray
    depth: np.ndarray
    visible_things: int
    occlusion: float
    texture_energy: float
    complexity: float


def complexity_score(visible_things: int, occlusion: float, texture_energy: float) -> float:
    """Combine scene statistics into a score in [0, 1].

    score = 0.5 * min(visible_things / 12, 1) + 0.25 * min(occlusion / 0.3, 1)
          + 0.25 * min(texture_energy / 0.04, 1)
    """
    visible = min(visible_things / VISIBLE_SATURATION, 1.0)
    occluded = min(occlusion / OCCLUSION_SATURATION, 1.0)
    texture = min(texture_energy / TEXTURE_SATURATION, 1.0)
    return 0.5 * visible + 0.25 * occluded + 0.25 * texture


def shade(scene: Scene, hits: RayHits) -> np.ndarray:
    """Return RGB (N, 3) in [0, 1]: textured albedo lit by ambient and Blinn-Phong lights.

    NOTE: no shadows are cast, so lighting alone never reveals one object resting on another.
    """
    count = len(hits.index)
    base = np.empty((count, 3))
    specular = np.empty(count)
    shininess = np.empty(count)
    for i, pixels in group_pixels(hits.index):
        material = scene.materials[i]
        base[pixels] = albedo(material, hits.local_points[pixels])
        specular[pixels] = material.specular
        shininess[pixels] = material.shininess

    view = -hits.points / hits.depth[:, None]  # unit vectors from the surface to the camera
    diffuse = np.broadcast_to(scene.ambient, (count, 3)).copy()
    highlight = np.zeros((count, 3))
    for direction, color in zip(scene.light_directions, scene.light_colors, strict=True):
        lambert = np.clip(hits.normals @ direction, 0.0, None)
        diffuse += lambert[:, None] * color
        halfway = view + direction
        halfway /= np.linalg.norm(halfway, axis=1, keepdims=True) + 1e-12
        facing = np.clip(np.sum(hits.normals * halfway, axis=1), 0.0, None)
        highlight += (specular * facing**shininess * (lambert > 0.0))[:, None] * color
    return np.clip(base * diffuse + highlight, 0.0, 1.0)


def _thing_statistics(scene: Scene, hits: RayHits, instance_map: np.ndarray):
    """Return visible pixel counts, silhouette pixel counts and occluded pixel counts per thing."""
    things = scene.num_objects + scene.num_people
    visible = np.bincount(instance_map[instance_map >= 0], minlength=things)
    silhouette = np.zeros((things, len(instance_map)), dtype=bool)
    for i, primitive in enumerate(scene.primitives):
        if primitive.instance >= 0:
            silhouette[primitive.instance] |= hits.silhouettes[i]
    covered = (instance_map >= 0)[None, :] & (instance_map[None, :] != np.arange(things)[:, None])
    occluded = np.sum(silhouette & covered, axis=1)
    return visible, silhouette.sum(axis=1), occluded


def _saliency(
    scene: Scene, hits: RayHits, instance_map: np.ndarray, visible: np.ndarray
) -> np.ndarray:
    count = len(instance_map)
    salient = [
        scene.num_objects + k
        for k in range(scene.num_people)
        if visible[scene.num_objects + k] >= PERSON_SALIENT_FRACTION * count
    ]
    candidates = [
        k for k in range(scene.num_objects) if visible[k] >= OBJECT_SALIENT_FRACTION * count
    ]
    candidates.sort(key=lambda k: float(np.median(hits.depth[instance_map == k])))
    salient += candidates[:SALIENT_OBJECTS]
    return np.isin(instance_map, salient) & (instance_map >= 0)


def render(scene: Scene, size: int, rng: np.random.Generator) -> RenderedScene:
    """Ray cast, shade and label `scene` at `size` x `size` pixels.

    `rng` draws the sensor effects (gain, noise, blur) and the JPEG quality.
    """
    hits = cast_rays(scene.primitives, size, scene.fov_y)
    semantic = np.array([p.semantic for p in scene.primitives], dtype=np.uint8)[hits.index]
    part = np.array([p.part for p in scene.primitives], dtype=np.uint8)[hits.index]
    instance_map = np.array([p.instance for p in scene.primitives])[hits.index]

    clean = shade(scene, hits).reshape(size, size, 3)
    luminance = clean @ np.array([0.299, 0.587, 0.114])
    texture_energy = 0.5 * (
        np.mean(np.abs(np.diff(luminance, axis=0))) + np.mean(np.abs(np.diff(luminance, axis=1)))
    )

    gain = rng.uniform(0.8, 1.1)
    noise_sigma = rng.uniform(0.0, 0.04) if rng.uniform() < 0.8 else 0.0
    blur_sigma = rng.uniform(0.3, 1.2) if rng.uniform() < 0.5 else 0.0
    jpeg_quality = int(rng.integers(40, 96))
    image = clean * gain + rng.normal(0.0, 1.0, clean.shape) * noise_sigma
    if blur_sigma > 0.0:
        image = gaussian_filter(image, sigma=(blur_sigma, blur_sigma, 0.0), mode="nearest")
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)

    visible, silhouette, occluded = _thing_statistics(scene, hits, instance_map)
    visible_things = int(np.sum(visible >= VISIBLE_FRACTION * len(instance_map)))
    occlusion = float(occluded.sum() / max(silhouette.sum(), 1))
    has_people = bool(np.any(semantic == PERSON))
    human_parts = part if has_people else np.full_like(part, IGNORE_INDEX)
    saliency = _saliency(scene, hits, instance_map, visible)
    return RenderedScene(
        image=image,
        jpeg_quality=jpeg_quality,
        semseg=semantic.reshape(size, size),
        human_parts=human_parts.reshape(size, size),
        normals=hits.normals.reshape(size, size, 3).astype(np.float32),
        saliency=saliency.reshape(size, size).astype(np.uint8),
        depth=hits.depth.reshape(size, size).astype(np.float32),
        visible_things=visible_things,
        occlusion=occlusion,
        texture_energy=float(texture_energy),
        complexity=complexity_score(visible_things, occlusion, float(texture_energy)),
    )
