"""Analytic ray casting of the primitives that make up a procedural scene.

Everything is in camera space: x points right, y up and z towards the viewer, so the camera
sits at the origin and looks along -z (the OpenGL convention). Pixel rays are unit vectors.

Each primitive is a canonical shape in its own local frame, placed by `center` (3,) and
`rotation` (3, 3), whose columns are the local axes in camera space. A ray is moved into the
local frame, intersected there in closed form (the torus by sphere tracing its exact signed
distance), and the local normal is rotated back. Shapes and their local `size` tuples:

    plane      ()                           the plane y = 0, seen only from +y
    sphere     (radius,)
    box        (half_x, half_y, half_z)
    cylinder   (radius, half_height)        axis y, capped at y = +-half_height
    cone       (radius, half_height)        apex at y = +half_height, base disc at -half_height
    torus      (major_radius, minor_radius) ring in the x-z plane around the y axis
    ellipsoid  (semi_x, semi_y, semi_z)
    capsule    (radius, half_length)        segment from y = -half_length to +half_length
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("plane", "sphere", "box", "cylinder", "cone", "torus", "ellipsoid", "capsule")

# Hits closer than this along a ray are discarded, so a surface never occludes itself.
_MIN_T = 1e-6
# Sphere tracing of the torus stops once the signed distance falls below this (scene units).
_TORUS_TOLERANCE = 1e-6
_TORUS_MAX_STEPS = 160


@dataclass
class Primitive:
    """One shape of a scene with its labels.

    Attributes:
        kind: One of KINDS.
        center: (3,) origin of the local frame in camera space.
        rotation: (3, 3) rotation whose columns are the local x, y, z axes in camera space.
        size: Shape parameters in scene units, as listed in the module docstring.
        semantic: Index into SCENE_SEMSEG_CLASSES.
        part: Human-part index (1 to 6) for pieces of a person, 0 otherwise.
        instance: Object id shared by all primitives of one object or person; -1 for the room.
    """

    kind: str
    center: np.ndarray
    rotation: np.ndarray
    size: tuple[float, ...]
    semantic: int
    part: int = 0
    instance: int = -1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"invalid primitive kind {self.kind!r}; valid kinds: {list(KINDS)}")

    def bounding_radius(self) -> float:
        """Return the radius of a sphere around `center` containing the shape (inf for planes)."""
        s = self.size
        if self.kind == "plane":
            return float("inf")
        if self.kind == "sphere":
            return s[0]
        if self.kind == "box":
            return float(np.linalg.norm(s))
        if self.kind == "ellipsoid":
            return max(s)
        if self.kind in ("cylinder", "cone"):
            return float(np.hypot(s[0], s[1]))
        return s[0] + s[1]  # torus (major + minor) and capsule (radius + half length)

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """Map camera-space points (M, 3) into the local frame (M, 3)."""
        return (points - self.center) @ self.rotation


@dataclass
class RayHits:
    """The first surface along each ray.

    Attributes:
        index: (N,) int, index of the hit primitive in the list that was cast against.
        depth: (N,) distance along the unit ray to the hit, in scene units.
        points: (N, 3) hit points in camera space.
        normals: (N, 3) unit outward surface normals in camera space.
        local_points: (N, 3) hit points in the hit primitive's local frame.
        silhouettes: (P, N) bool, True where primitive p is hit at all, occluded or not.
    """

    index: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    normals: np.ndarray
    local_points: np.ndarray
    silhouettes: np.ndarray


def pixel_rays(size: int, fov_y: float) -> np.ndarray:
    """Return unit ray directions (size * size, 3) through the pixel centres, row-major.

    Row 0 is the top of the image. `fov_y` is the vertical (and horizontal) field of view in
    radians of the square image.
    """
    half = np.tan(fov_y / 2.0)
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    x = np.broadcast_to(coords[None, :] * half, (size, size))
    y = np.broadcast_to(-coords[:, None] * half, (size, size))
    directions = np.stack([x, y, -np.ones((size, size))], axis=-1).reshape(-1, 3)
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def _smallest_positive(candidates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return the smallest valid root per ray and which candidate it came from."""
    stacked = np.stack(candidates)  # (K, M)
    stacked = np.where(stacked > _MIN_T, stacked, np.inf)
    source = np.argmin(stacked, axis=0)
    return np.take_along_axis(stacked, source[None], axis=0)[0], source


def _quadratic_roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both roots of a t^2 + 2 b t + c = 0 (nan where there is none), smaller first."""
    disc = b * b - a * c
    valid = (disc >= 0.0) & (np.abs(a) > 1e-12)
    root = np.sqrt(np.where(valid, disc, 0.0))
    safe_a = np.where(valid, a, 1.0)
    t0 = np.where(valid, (-b - root) / safe_a, np.nan)
    t1 = np.where(valid, (-b + root) / safe_a, np.nan)
    return np.fmin(t0, t1), np.fmax(t0, t1)


def _within(values: np.ndarray, low: float, high: float, roots: np.ndarray) -> np.ndarray:
    return np.where((values >= low) & (values <= high), roots, np.nan)


def _intersect_plane(o, d, size):
    t = np.where(d[:, 1] < 0.0, -o[1] / np.where(d[:, 1] < 0.0, d[:, 1], -1.0), np.inf)
    normals = np.zeros_like(d)
    normals[:, 1] = 1.0
    return np.where(t > _MIN_T, t, np.inf), normals


def _intersect_sphere(o, d, size):
    (radius,) = size
    b = d @ o
    c = o @ o - radius * radius
    t0, t1 = _quadratic_roots(np.ones_like(b), b, np.full_like(b, c))
    t, _ = _smallest_positive([t0, t1])
    return t, (o + t[:, None] * d) / radius


def _intersect_ellipsoid(o, d, size):
    axes = np.asarray(size)
    scaled_origin, scaled_dirs = o / axes, d / axes
    a = np.sum(scaled_dirs * scaled_dirs, axis=1)
    c = np.full(len(d), scaled_origin @ scaled_origin - 1.0)
    t0, t1 = _quadratic_roots(a, scaled_dirs @ scaled_origin, c)
    t, _ = _smallest_positive([t0, t1])
    gradient = (o + t[:, None] * d) / axes**2
    return t, gradient


def _intersect_box(o, d, size):
    half = np.asarray(size)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / d
        t_low = (-half - o) * inverse
        t_high = (half - o) * inverse
    t_near = np.fmin(t_low, t_high)  # (M, 3)
    t_far = np.fmax(t_low, t_high)
    axis = np.argmax(t_near, axis=1)
    entry = np.take_along_axis(t_near, axis[:, None], axis=1)[:, 0]
    exit_ = np.min(t_far, axis=1)
    hit = (entry <= exit_) & (entry > _MIN_T)
    normals = np.zeros_like(d)
    rows = np.arange(len(d))
    normals[rows, axis] = -np.sign(d[rows, axis])
    return np.where(hit, entry, np.inf), normals


def _disc_hit(o, d, height: float, radius: float) -> np.ndarray:
    """Return t where rays cross the plane y = height inside a disc of `radius` (nan if not)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (height - o[1]) / d[:, 1]
    x = o[0] + t * d[:, 0]
    z = o[2] + t * d[:, 2]
    return np.where(np.isfinite(t) & (x * x + z * z <= radius * radius), t, np.nan)


def _side_roots(o, d, a, b, c, half_height):
    """Return the roots of the lateral quadratic that lie within |y| <= half_height."""
    t0, t1 = _quadratic_roots(a, b, c)
    return [_within(o[1] + t * d[:, 1], -half_height, half_height, t) for t in (t0, t1)]


def _intersect_cylinder(o, d, size):
    radius, half = size
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[0] * d[:, 0] + o[2] * d[:, 2]
    c = np.full_like(a, o[0] ** 2 + o[2] ** 2 - radius * radius)
    side = _side_roots(o, d, a, b, c, half)
    caps = [_disc_hit(o, d, half, radius), _disc_hit(o, d, -half, radius)]
    t, source = _smallest_positive(side + caps)
    p = o + t[:, None] * d
    normals = np.stack([p[:, 0], np.zeros_like(t), p[:, 2]], axis=1) / radius
    normals[source == 2] = (0.0, 1.0, 0.0)
    normals[source == 3] = (0.0, -1.0, 0.0)
    return t, normals


def _intersect_cone(o, d, size):
    radius, half = size
    k2 = (radius / (2.0 * half)) ** 2
    # x^2 + z^2 = k^2 (half - y)^2, with q = half - y = q0 + t * qd along the ray.
    q0, qd = half - o[1], -d[:, 1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * qd * qd
    b = o[0] * d[:, 0] + o[2] * d[:, 2] - k2 * q0 * qd
    c = o[0] ** 2 + o[2] ** 2 - k2 * q0 * q0
    side = _side_roots(o, d, a, b, np.full_like(a, c), half)
    base = _disc_hit(o, d, -half, radius)
    t, source = _smallest_positive(side + [base])
    p = o + t[:, None] * d
    normals = np.stack([p[:, 0], k2 * (half - p[:, 1]), p[:, 2]], axis=1)
    normals[source == 2] = (0.0, -1.0, 0.0)
    return t, normals


def _intersect_capsule(o, d, size):
    radius, half = size
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = o[0] * d[:, 0] + o[2] * d[:, 2]
    c = np.full_like(a, o[0] ** 2 + o[2] ** 2 - radius * radius)
    side = _side_roots(o, d, a, b, c, half)
    ends = []
    for end in (half, -half):
        shifted = o - np.array([0.0, end, 0.0])
        c_end = np.full_like(a, shifted @ shifted - radius * radius)
        ends += list(_quadratic_roots(np.ones_like(a), d @ shifted, c_end))
    t, _ = _smallest_positive(side + ends)
    p = o + t[:, None] * d
    axis_point = np.zeros_like(p)
    axis_point[:, 1] = np.clip(p[:, 1], -half, half)
    return t, p - axis_point


def torus_distance(points: np.ndarray, major: float, minor: float) -> np.ndarray:
    """Return the exact signed distance (M,) from local points (M, 3) to a torus around y."""
    ring = np.hypot(points[:, 0], points[:, 2]) - major
    return np.hypot(ring, points[:, 1]) - minor


def _intersect_torus(o, d, size):
    major, minor = size
    # Start where the ray enters the bounding sphere and march by the exact signed distance,
    # which never steps through the surface.
    bound = major + minor
    b = d @ o
    disc = b * b - (o @ o - bound * bound)
    t = np.full(len(d), np.inf)
    candidates = np.flatnonzero(disc > 0.0)
    root = np.sqrt(disc[candidates])
    march = np.maximum(-b[candidates] - root, 0.0)
    limit = -b[candidates] + root
    active = np.arange(len(candidates))
    for _ in range(_TORUS_MAX_STEPS):
        if active.size == 0:
            break
        rays = d[candidates[active]]
        distance = torus_distance(o + march[active, None] * rays, major, minor)
        converged = distance < _TORUS_TOLERANCE
        t[candidates[active[converged]]] = march[active[converged]]
        march[active] += distance
        keep = ~converged & (march[active] < limit[active])
        active = active[keep]
    # NOTE: rays that graze the tube may still be marching after _TORUS_MAX_STEPS. They count
    # as misses, which can drop single silhouette pixels but never mislabels a hit.
    p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
    ring = np.hypot(p[:, 0], p[:, 2])
    scale = 1.0 - major / np.maximum(ring, 1e-12)
    normals = np.stack([p[:, 0] * scale, p[:, 1], p[:, 2] * scale], axis=1)
    return np.where(t > _MIN_T, t, np.inf), normals


_INTERSECT = {
    "plane": _intersect_plane,
    "sphere": _intersect_sphere,
    "box": _intersect_box,
    "cylinder": _intersect_cylinder,
    "cone": _intersect_cone,
    "torus": _intersect_torus,
    "ellipsoid": _intersect_ellipsoid,
    "capsule": _intersect_capsule,
}


def intersect(primitive: Primitive, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersect rays from the camera origin with one primitive.

    Args:
        primitive: The shape to hit.
        directions: (M, 3) unit ray directions in camera space.

    Returns:
        depth (M,), inf where the ray misses, and unit normals (M, 3) in camera space, only
        meaningful where depth is finite.
    """
    origin = -primitive.center @ primitive.rotation  # (3,) camera origin in the local frame
    local_directions = directions @ primitive.rotation  # (M, 3)
    with np.errstate(invalid="ignore", over="ignore"):
        depth, local_normals = _INTERSECT[primitive.kind](origin, local_directions, primitive.size)
    local_normals[~np.isfinite(depth)] = 0.0
    normals = local_normals @ primitive.rotation.T
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return depth, normals / np.where(length > 0.0, length, 1.0)


def _candidate_pixels(primitive: Primitive, size: int, half_fov: float) -> np.ndarray | None:
    """Return the flat indices of pixels whose rays may hit `primitive`, or None for all.

    The projection of the corners of the bounding cube bounds the projection of the shape,
    as long as every corner lies in front of the camera.
    """
    radius = primitive.bounding_radius()
    if not np.isfinite(radius):
        return None
    corners = primitive.center + radius * np.array(
        [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float
    )
    if np.any(corners[:, 2] > -1e-3):
        return None
    tan_half = np.tan(half_fov)
    u = corners[:, 0] / -corners[:, 2] / tan_half
    v = corners[:, 1] / -corners[:, 2] / tan_half
    col_low = int(np.floor((u.min() + 1.0) / 2.0 * size - 0.5))
    col_high = int(np.ceil((u.max() + 1.0) / 2.0 * size - 0.5))
    row_low = int(np.floor((1.0 - v.max()) / 2.0 * size - 0.5))
    row_high = int(np.ceil((1.0 - v.min()) / 2.0 * size - 0.5))
    col_low, row_low = max(col_low, 0), max(row_low, 0)
    col_high, row_high = min(col_high, size - 1), min(row_high, size - 1)
    if col_low > col_high or row_low > row_high:
        return np.empty(0, dtype=np.int64)
    rows = np.arange(row_low, row_high + 1)
    cols = np.arange(col_low, col_high + 1)
    return (rows[:, None] * size + cols[None, :]).reshape(-1)


def cast_rays(primitives: list[Primitive], size: int, fov_y: float) -> RayHits:
    """Find the first surface under every pixel centre of a square `size` x `size` image.

    The primitives must enclose the camera (the room does), so every ray hits something. An
    AssertionError is raised otherwise. Pixels are row-major, row 0 at the top.
    """
    directions = pixel_rays(size, fov_y)
    count = len(directions)
    depth = np.full(count, np.inf)
    index = np.full(count, -1, dtype=np.int64)
    normals = np.zeros((count, 3))
    silhouettes = np.zeros((len(primitives), count), dtype=bool)
    for i, primitive in enumerate(primitives):
        pixels = _candidate_pixels(primitive, size, fov_y / 2.0)
        if pixels is None:  # whole image: boolean masks are cheaper than index arrays
            t, n = intersect(primitive, directions)
            silhouettes[i] = np.isfinite(t)
            target = t < depth
        elif pixels.size == 0:
            continue
        else:
            t, n = intersect(primitive, directions[pixels])
            silhouettes[i, pixels[np.isfinite(t)]] = True
            closer = t < depth[pixels]
            target = pixels[closer]
            t, n = t[closer], n[closer]
            if target.size == 0:
                continue
        depth[target] = t if pixels is not None else t[target]
        index[target] = i
        normals[target] = n if pixels is not None else n[target]
    assert np.all(index >= 0), "some rays escaped the scene; the room must enclose the camera"
    points = directions * depth[:, None]
    local_points = np.empty_like(points)
    for i, pixels in group_pixels(index):
        local_points[pixels] = primitives[i].to_local(points[pixels])
    return RayHits(index, depth, points, normals, local_points, silhouettes)


def group_pixels(index: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split pixel positions by primitive: [(primitive index, flat pixel indices), ...]."""
    order = np.argsort(index, kind="stable")
    values, starts = np.unique(index[order], return_index=True)
    return list(zip(values.tolist(), np.split(order, starts[1:]), strict=True))
