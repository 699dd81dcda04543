"""A mask's outline as a polygon, without OpenCV: what a PolygonLabels region needs from a segmenter
that answers with masks (torchvision's Mask R-CNN does; ultralytics gives polygons itself)."""

from __future__ import annotations

from typing import Any

Point = tuple[float, float]


def mask_outline(mask: Any, tolerance: float = 1.0, threshold: float = 0.5) -> list[Point]:
    """The outer boundary of the mask's first blob (in reading order), as pixel-corner points (x, y),
    simplified so that no dropped point lies more than ``tolerance`` pixels off the outline. A filled
    rectangle of pixels [x0, x1) x [y0, y1) gives exactly its four corners. Empty mask: ``[]``."""
    import numpy as np

    array = np.asarray(mask)
    inside = array > threshold if array.dtype.kind == "f" else array > 0
    if inside.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), got shape {inside.shape}")
    rows, columns = np.nonzero(inside)
    if not len(rows):
        return []
    height, width = inside.shape

    def filled(x: int, y: int) -> bool:
        return 0 <= x < width and 0 <= y < height and bool(inside[y, x])

    start = (int(columns[0]), int(rows[0]))  # np.nonzero reads row by row: the first row's leftmost pixel
    point, direction = start, (1, 0)  # along that pixel's top edge, the blob on the right hand
    corners: list[Point] = []
    for step in range(4 * inside.size + 4):
        dx, dy = direction
        right, left = (-dy, dx), (dy, -dx)
        ahead_right = filled(*_pixel_at(point, direction, right))
        ahead_left = filled(*_pixel_at(point, direction, left))
        turn = right if not ahead_right else left if ahead_left else direction
        if turn != direction:
            corners.append((float(point[0]), float(point[1])))
        if step and point == start and turn == (1, 0):
            break  # round the blob, back on the first edge
        direction = turn
        point = (point[0] + direction[0], point[1] + direction[1])
    return _simplify(corners, tolerance) if len(corners) > 4 else corners


def _pixel_at(corner: tuple[int, int], direction: tuple[int, int], side: tuple[int, int]) -> tuple[int, int]:
    """The pixel ahead of a lattice corner, on one side of the direction of travel."""
    import math

    return (math.floor(corner[0] + 0.5 * direction[0] + 0.5 * side[0]),
            math.floor(corner[1] + 0.5 * direction[1] + 0.5 * side[1]))


def _simplify(points: list[Point], tolerance: float) -> list[Point]:
    """Ramer-Douglas-Peucker on a closed ring: a staircase of pixel corners to the few points of its shape."""
    if tolerance <= 0 or len(points) < 4:
        return points
    far = max(range(len(points)), key=lambda i: _distance2(points[i], points[0]))
    return _rdp(points[: far + 1], tolerance)[:-1] + _rdp(points[far:] + points[:1], tolerance)[:-1]


def _rdp(points: list[Point], tolerance: float) -> list[Point]:
    if len(points) < 3:
        return points
    (x0, y0), (x1, y1) = points[0], points[-1]
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-12)
    offsets = [abs((x1 - x0) * (y0 - y) - (x0 - x) * (y1 - y0)) / length for x, y in points[1:-1]]
    worst = max(range(len(offsets)), key=offsets.__getitem__) + 1
    if offsets[worst - 1] <= tolerance:
        return [points[0], points[-1]]
    return _rdp(points[: worst + 1], tolerance)[:-1] + _rdp(points[worst:], tolerance)


def _distance2(a: Point, b: Point) -> float:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2
