"""Plane geometry of region queries (level-0 pixel coordinates)."""

from __future__ import annotations


def inside(x: float, y: float, ring: list[tuple[int, int]]) -> bool:
    """Whether (x, y) lies inside the polygon (even-odd rule; the ring need not repeat its first vertex)."""
    hit = False
    j = len(ring) - 1
    for i, (xi, yi) in enumerate(ring):
        xj, yj = ring[j]
        if (yi > y) != (yj > y) and x < xi + (y - yi) * (xj - xi) / (yj - yi):
            hit = not hit
        j = i
    return hit
