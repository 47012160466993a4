"""Random layout of a procedural scene: room, camera, objects, people, materials and lights.

The scene is built in world space (y up, floor at y = 0) and then moved into camera space
(x right, y up, z towards the viewer) for `scene_geometry.cast_rays`. Lengths are in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_core.presets import SCENE_SEMSEG_CLASSES
from training.datasets.scene_geometry import Primitive
from training.datasets.scene_texture import Material, sample_material

OBJECT_KINDS = ("sphere", "box", "cylinder", "cone", "torus", "ellipsoid")
FLOOR, WALL, PERSON = (SCENE_SEMSEG_CLASSES.index(n) for n in ("floor", "wall", "person"))
MAX_OBJECTS = 12
MAX_PEOPLE = 3

# Human-part indices of HUMAN_PARTS_CLASSES.
HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = range(1, 7)

_SKIN_TONES = np.array(
    [
        [0.96, 0.80, 0.69],
        [0.87, 0.67, 0.52],
        [0.70, 0.50, 0.36],
        [0.47, 0.32, 0.22],
        [0.32, 0.21, 0.14],
    ]
)


@dataclass
class Scene:
    """A sampled scene in camera space.

    Attributes:
        primitives: Shapes, with the room first, then objects, then people.
        materials: One material per primitive.
        light_directions: (L, 3) unit vectors from surfaces towards each light, camera space.
        light_colors: (L, 3) RGB intensities.
        ambient: (3,) RGB ambient intensity.
        fov_y: Field of view of the square image in radians.
        clutter: Value in [0, 1] that set the object and person counts and texture odds.
        num_objects: Number of primitives of the six object classes.
        num_people: Number of people.
    """

    primitives: list[Primitive]
    materials: list[Material]
    light_directions: np.ndarray
    light_colors: np.ndarray
    ambient: np.ndarray
    fov_y: float
    clutter: float
    num_objects: int
    num_people: int


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Draw a rotation matrix uniformly (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0.0:
        q[:, 0] = -q[:, 0]
    return q


def frame_along(axis: np.ndarray) -> np.ndarray:
    """Return a rotation whose second column (local y) is the unit vector `axis`."""
    y = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0.0, 0.0]) if abs(y[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    x = np.cross(y, helper)
    x /= np.linalg.norm(x)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=1)


@dataclass
class _Camera:
    position: np.ndarray  # (3,) world
    rotation: np.ndarray  # (3, 3) camera-to-world, columns are the camera axes in world space
    fov_y: float

    def to_camera(self, point: np.ndarray) -> np.ndarray:
        return (point - self.position) @ self.rotation

    def floor_point(self, u: float, v: float) -> np.ndarray | None:
        """Return where the ray through normalised image coordinates (u, v) meets the floor."""
        tan_half = np.tan(self.fov_y / 2.0)
        direction = self.rotation @ np.array([u * tan_half, v * tan_half, -1.0])
        if direction[1] > -1e-3:
            return None
        return self.position + (-self.position[1] / direction[1]) * direction


def _room(rng: np.random.Generator, camera: _Camera, textured: float):
    """Build floor, ceiling and four walls around the camera, normals facing inwards.

    Returns the planes, their materials and (half width, depth) of the room in front.
    """
    half_width = rng.uniform(3.0, 6.0)
    depth = rng.uniform(7.0, 14.0)
    height = rng.uniform(3.0, 5.0)
    # (point on plane, inward normal, class). The ceiling is labelled as wall.
    planes = [
        ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), FLOOR),
        ((0.0, height, 0.0), (0.0, -1.0, 0.0), WALL),
        ((-half_width, 0.0, 0.0), (1.0, 0.0, 0.0), WALL),
        ((half_width, 0.0, 0.0), (-1.0, 0.0, 0.0), WALL),
        ((0.0, 0.0, -depth), (0.0, 0.0, 1.0), WALL),
        ((0.0, 0.0, 3.0), (0.0, 0.0, -1.0), WALL),
    ]
    floor_material = sample_material(rng, textured, scale_range=(0.3, 1.2))
    wall_material = sample_material(rng, textured, scale_range=(0.3, 1.5))
    primitives, materials = [], []
    for point, normal, semantic in planes:
        world_frame = frame_along(np.asarray(normal))
        primitives.append(
            Primitive(
                "plane",
                center=camera.to_camera(np.asarray(point)),
                rotation=camera.rotation.T @ world_frame,
                size=(),
                semantic=semantic,
            )
        )
        materials.append(floor_material if semantic == FLOOR else wall_material)
    return primitives, materials, (half_width, depth)


def _sample_spot(rng, camera: _Camera, bounds, distance_range, v_range) -> np.ndarray:
    """Draw a floor point in view, inside the room, at a distance in `distance_range`."""
    half_width, depth = bounds
    for _ in range(50):
        point = camera.floor_point(rng.uniform(-0.85, 0.85), rng.uniform(*v_range))
        if point is None:
            continue
        distance = np.hypot(point[0] - camera.position[0], point[2] - camera.position[2])
        inside = abs(point[0]) < half_width - 0.6 and point[2] > -depth + 0.6
        if inside and distance_range[0] <= distance <= distance_range[1]:
            return point
    # Fallback straight ahead of the camera, which is always inside the room.
    forward = camera.rotation @ np.array([0.0, 0.0, -1.0])
    forward[1] = 0.0
    return camera.position * np.array([1.0, 0.0, 1.0]) + 3.0 * forward / np.linalg.norm(forward)


def _object_size(rng: np.random.Generator, kind: str) -> tuple[tuple[float, ...], float]:
    """Draw the size tuple of a shape and the half height it has when resting upright."""
    s = rng.uniform(0.2, 0.7)
    if kind == "sphere":
        return (s,), s
    if kind == "box":
        half = s * rng.uniform(0.5, 1.1, 3)
        return tuple(half), half[1]
    if kind in ("cylinder", "cone"):
        radius, half = s * rng.uniform(0.4, 1.0), s * rng.uniform(0.6, 1.4)
        return (radius, half), half
    if kind == "torus":
        major = s * rng.uniform(0.7, 1.1)
        minor = major * rng.uniform(0.2, 0.45)
        return (major, minor), minor
    semi = s * rng.uniform(0.4, 1.2, 3)
    return tuple(semi), semi[1]


def _objects(rng, camera, bounds, count, textured, first_instance):
    primitives, materials = [], []
    for i in range(count):
        kind = str(rng.choice(OBJECT_KINDS))
        size, resting_half_height = _object_size(rng, kind)
        primitive = Primitive(kind, np.zeros(3), np.eye(3), size, SCENE_SEMSEG_CLASSES.index(kind))
        spot = _sample_spot(rng, camera, bounds, (1.8, 11.0), (-0.95, 0.2))
        if rng.uniform() < 0.6:  # resting upright on the floor, turned about the vertical
            rotation = rotation_y(rng.uniform(0.0, 2.0 * np.pi))
            lift = resting_half_height
            if kind == "torus" and rng.uniform() < 0.5:  # standing on its rim
                rotation = rotation @ rotation_x(np.pi / 2.0)
                lift = size[0] + size[1]
        else:  # floating, in any orientation
            rotation = random_rotation(rng)
            lift = primitive.bounding_radius() + rng.uniform(0.0, 1.0)
        world_center = spot + np.array([0.0, lift, 0.0])
        primitive.center = camera.to_camera(world_center)
        primitive.rotation = camera.rotation.T @ rotation
        primitive.instance = first_instance + i
        primitives.append(primitive)
        materials.append(sample_material(rng, textured))
    return primitives, materials


def _limb_direction(flex: float, abduction: float, side: float) -> np.ndarray:
    """Unit vector of a limb hanging down, swung forward by `flex` and outward by `abduction`.

    Person frame: x to the person's left when `side` is +1, y up, z forward.
    """
    return np.array(
        [
            side * np.sin(abduction) * np.cos(flex),
            -np.cos(abduction) * np.cos(flex),
            np.sin(flex),
        ]
    )


def _person_parts(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray, tuple, int]]:
    """Pose one person in its own frame (feet on y = 0, facing +z).

    Returns (kind, center, rotation, size, part) for every body part.
    """
    height = rng.uniform(1.45, 1.9)
    build = rng.uniform(0.85, 1.2)  # thickness factor
    upper_leg, lower_leg = height * rng.uniform(0.22, 0.26), height * rng.uniform(0.23, 0.27)
    upper_arm, lower_arm = height * rng.uniform(0.15, 0.18), height * rng.uniform(0.15, 0.18)
    pelvis = np.array([0.0, upper_leg + lower_leg + 0.03 * height, 0.0])
    lean = rng.uniform(-0.15, 0.35)
    spine = 0.3 * height * np.array([0.0, np.cos(lean), np.sin(lean)])
    neck = pelvis + spine
    parts = []

    torso_semi = (0.11 * height * build, 0.55 * np.linalg.norm(spine), 0.065 * height * build)
    parts.append(("ellipsoid", pelvis + 0.5 * spine, rotation_x(lean), torso_semi, TORSO))
    tilt = rotation_x(lean + rng.uniform(-0.3, 0.3)) @ rotation_z(rng.uniform(-0.25, 0.25))
    head_semi = tuple(height * np.array([0.052, 0.066, 0.058]) * rng.uniform(0.9, 1.1))
    head_center = neck + tilt @ np.array([0.0, head_semi[1] + 0.015 * height, 0.0])
    parts.append(("ellipsoid", head_center, tilt, head_semi, HEAD))

    def limb(start, direction, length, radius, part):
        end = start + length * direction
        parts.append(
            (
                "capsule",
                start + 0.5 * (end - start),
                frame_along(direction),
                (radius, 0.5 * length),
                part,
            )
        )
        return end

    shoulder_width = torso_semi[0] * 1.05
    hip_width = 0.055 * height * build
    for side in (-1.0, 1.0):
        shoulder = pelvis + 0.88 * spine + np.array([side * shoulder_width, 0.0, 0.0])
        abduction = rng.uniform(0.05, 1.6)
        flex = rng.uniform(-0.7, 1.5)
        elbow = limb(
            shoulder,
            _limb_direction(flex, abduction, side),
            upper_arm,
            0.032 * height * build,
            UPPER_ARM,
        )
        bend = rng.uniform(0.0, 2.0)
        limb(
            elbow,
            _limb_direction(flex + bend, abduction, side),
            lower_arm,
            0.026 * height * build,
            LOWER_ARM,
        )

        hip = pelvis + np.array([side * hip_width, -0.02 * height, 0.0])
        leg_flex = rng.uniform(-0.5, 0.7)
        leg_abduction = rng.uniform(0.0, 0.3)
        knee = limb(
            hip,
            _limb_direction(leg_flex, leg_abduction, side),
            upper_leg,
            0.048 * height * build,
            UPPER_LEG,
        )
        knee_bend = rng.uniform(0.0, 1.2)
        limb(
            knee,
            _limb_direction(leg_flex - knee_bend, leg_abduction, side),
            lower_leg,
            0.038 * height * build,
            LOWER_LEG,
        )

    # Put the lowest point of the capsules on the floor.
    lowest = min(
        center[1] - abs(rotation[1, 1]) * size[1] - size[0]
        for kind, center, rotation, size, _ in parts
        if kind == "capsule"
    )
    return [(k, c - np.array([0.0, lowest, 0.0]), r, s, p) for k, c, r, s, p in parts]


def _people(rng, camera, bounds, count, textured, first_instance):
    primitives, materials = [], []
    for i in range(count):
        spot = _sample_spot(rng, camera, bounds, (2.6, 7.0), (-0.9, 0.0))
        yaw = rotation_y(rng.uniform(0.0, 2.0 * np.pi))
        skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.05)
        shirt = sample_material(rng, textured, scale_range=(0.03, 0.15))
        trousers = sample_material(rng, 0.5 * textured, scale_range=(0.03, 0.15))
        skin_material = Material(
            "plain", np.stack([np.clip(skin, 0, 1)] * 2), 1.0, np.array([0.0, 1.0, 0.0])
        )
        short_sleeves, shorts = rng.uniform() < 0.4, rng.uniform() < 0.3
        by_part = {
            HEAD: skin_material,
            TORSO: shirt,
            UPPER_ARM: shirt,
            LOWER_ARM: skin_material if short_sleeves else shirt,
            UPPER_LEG: trousers,
            LOWER_LEG: skin_material if shorts else trousers,
        }
        for kind, center, rotation, size, part in _person_parts(rng):
            world_center = spot + yaw @ center
            primitives.append(
                Primitive(
                    kind,
                    camera.to_camera(world_center),
                    camera.rotation.T @ yaw @ rotation,
                    tuple(float(x) for x in size),
                    PERSON,
                    part=part,
                    instance=first_instance + i,
                )
            )
            materials.append(by_part[part])
    return primitives, materials


def clutter_counts(rng: np.random.Generator, clutter: float) -> tuple[int, int]:
    """Map clutter in [0, 1] to (objects, people): 1 to MAX_OBJECTS objects, people from 0.25."""
    objects = min(1 + int(clutter * MAX_OBJECTS), MAX_OBJECTS)
    people = int(rng.integers(0, min(MAX_PEOPLE, int(clutter * 4)) + 1))
    return objects, people


def sample_scene(
    rng: np.random.Generator,
    clutter: float | None = None,
    num_objects: int | None = None,
    num_people: int | None = None,
) -> Scene:
    """Draw a random scene; `clutter` (uniform in [0, 1] when None) sets counts and textures.

    `num_objects` and `num_people` override the counts that `clutter` implies.
    """
    if clutter is None:
        clutter = float(rng.uniform())
    objects, people = clutter_counts(rng, clutter)
    objects = objects if num_objects is None else num_objects
    people = people if num_people is None else num_people
    if not 0 <= objects <= MAX_OBJECTS or not 0 <= people <= MAX_PEOPLE:
        raise ValueError(
            f"invalid counts: {objects} objects and {people} people; "
            f"use 0 to {MAX_OBJECTS} objects and 0 to {MAX_PEOPLE} people"
        )

    fov_y = np.radians(rng.uniform(45.0, 65.0))
    pitch = np.radians(rng.uniform(8.0, 30.0))
    camera = _Camera(
        position=np.array([rng.uniform(-1.0, 1.0), rng.uniform(1.2, 2.2), 0.0]),
        rotation=rotation_y(np.radians(rng.uniform(-25.0, 25.0))) @ rotation_x(-pitch),
        fov_y=fov_y,
    )
    textured = min(1.0, 0.1 + clutter)
    primitives, materials, bounds = _room(rng, camera, clutter)
    things, thing_materials = _objects(rng, camera, bounds, objects, textured, 0)
    persons, person_materials = _people(rng, camera, bounds, people, textured, objects)

    light_count = 1 if rng.uniform() < 0.5 else 2
    elevation = rng.uniform(np.radians(25.0), np.radians(80.0), light_count)
    azimuth = rng.uniform(0.0, 2.0 * np.pi, light_count)
    world_directions = np.stack(
        [
            np.cos(elevation) * np.sin(azimuth),
            np.sin(elevation),
            np.cos(elevation) * np.cos(azimuth),
        ],
        axis=1,
    )
    intensity = np.array([rng.uniform(0.7, 1.1), rng.uniform(0.25, 0.6)])[:light_count]
    tint = np.clip(1.0 + rng.uniform(-0.25, 0.25, (light_count, 3)), 0.0, None)
    return Scene(
        primitives=primitives + things + persons,
        materials=materials + thing_materials + person_materials,
        light_directions=world_directions @ camera.rotation,
        light_colors=intensity[:, None] * tint,
        ambient=rng.uniform(0.15, 0.35) * (1.0 + rng.uniform(-0.1, 0.1, 3)),
        fov_y=float(fov_y),
        clutter=float(clutter),
        num_objects=objects,
        num_people=people,
    )
