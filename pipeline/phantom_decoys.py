"""Context-matched decoys for the CT phantom: `seg3d synth --decoys matched`.

The classic decoys (pipeline.synthetic) share the pancreas's HU, texture and tube radius, but a network with a small
field of view can still tell them apart: they are a third of the gland's length, and they float in plain fat, whereas
the gland has a thin fat plane and organs just beyond it (benchmarks/phantom_context.py measures both cues). Matched
decoys remove these local cues so that only where they are tells them from the gland:

- a quadratic Bezier tube of the gland's length, bend and radius profile (14 -> 8 body mm, the same jitter), painted
  by the same function as the gland (HU, lobules, fatty clefts);
- wrapped in the same fat plane (radius + 4 body mm, the same HU and texture);
- beyond the fat plane, on one side of the tube (the half-space bounded by the plane the curve lies in, shifted 3 mm
  past it), 20 body mm of enhancing soft tissue, as a collapsed bowel loop or an organ lying against the gland: so a
  shell 3-6 mm outside is a little under half fat at every voxel size and scale, as the gland's is.

A decoy is placed by rejection sampling, from the case's decoy stream only: its tube and fat plane lie in fat inside
the abdominal cavity and wholly in the field of view (a piece as large as the gland), and nothing it paints comes near
the gland, its fat plane, the duodenum or another decoy, nor covers bone, kidney, aorta or gas. A case with a short
field of view may have no room for all its decoys: those that do not fit are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.synthetic import HU, bezier

FAT_PLANE_MM = 4.0  # the gland's peripancreatic fat plane, radius + 4 body mm
NEIGHBOUR_MM = 20.0  # fat plane + this = 24 body mm, 6 mm or more wherever a body mm is >= 0.25 mm (most cases)
NEIGHBOUR_HU = 100.0  # enhancing bowel wall / parenchyma in the portal-venous phase, as the organs round the gland
NEIGHBOUR_TEXTURE = 10.0
NEIGHBOUR_OFFSET_MM = 3.0  # the soft tissue reaches this far past the curve's plane: a little over half the shell
CLEARANCE_MM = 8.0  # between everything a decoy paints and the gland's fat plane, the duodenum or another decoy
TRIES = 2000  # placements tried per decoy before it is left out (most fail on the curve alone, cheaply)


@dataclass(frozen=True)
class Scene:
    """What painting the decoys needs of the case being drawn; arrays in RAS voxel order, coordinates in body mm."""

    image: np.ndarray  # float32 HU before blur and noise, painted in place
    grid: Any  # pipeline.synthetic._Grid of the case
    body: np.ndarray  # inside the skin
    cavity: tuple[float, float]  # semi-axes (x, y) of the abdominal cavity, inside the muscle wall
    avoid: list[tuple[np.ndarray, np.ndarray]]  # tubes (points, radii) to keep clear of: gland + fat plane, duodenum
    texture: np.ndarray  # unit-std soft-tissue texture field
    paint_pancreas_like: Callable[[np.ndarray], None]  # the gland's own painter (lobules, clefts), clipped to body


def _draw_curve(rng: np.random.Generator, z_range: tuple[float, float], cavity: tuple[float, float]):
    """A candidate tube (points, radii) shaped as the gland's: chord ~127 body mm bent ~18 mm in-plane, radii 14 -> 8
    with the gland's jitter, its head at either end."""
    length = 127.0 * rng.uniform(0.92, 1.08)
    theta, slope = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)  # mostly in-plane, as the gland
    d = np.array([np.cos(theta), np.sin(theta), slope])
    d /= np.linalg.norm(d)
    e = np.cross(d, [0.0, 0.0, 1.0]) + rng.normal(scale=0.2, size=3)  # the bend, in-plane as the gland's
    e /= np.linalg.norm(e)
    c = np.array([rng.uniform(-1, 1) * cavity[0], rng.uniform(-1, 1) * cavity[1], rng.uniform(*z_range)])
    points = bezier(c - length / 2 * d, c + rng.uniform(25, 45) * e, c + length / 2 * d)
    radii = np.linspace(14 * rng.uniform(0.9, 1.1), 8 * rng.uniform(0.9, 1.1), len(points))
    return (points, radii) if rng.random() < 0.5 else (points[::-1], radii)


def _fits(points: np.ndarray, radii: np.ndarray, scene: Scene, avoid: list) -> bool:
    """The tube and its fat plane inside the cavity and the field of view (a whole piece, as the gland), and all it
    may paint clear of the tubes in `avoid`. Checked on the curves, before any voxel: a tube is a union of balls, so
    two are apart when every pair of their balls is."""
    margin = radii + FAT_PLANE_MM
    (ax, ay), z = scene.cavity, scene.grid.axes[2]
    inside = (points[:, 0] / (ax - margin)) ** 2 + (points[:, 1] / (ay - margin)) ** 2 <= 1.0
    in_view = (points[:, 2] - margin >= z[0]) & (points[:, 2] + margin <= z[-1])
    if not (inside.all() and in_view.all()):
        return False
    reach = radii + FAT_PLANE_MM + NEIGHBOUR_MM + CLEARANCE_MM
    for other, other_radii in avoid:
        gap = np.linalg.norm(points[:, None, :] - other[None, :, :], axis=-1) - reach[:, None] - other_radii[None, :]
        if gap.min() <= 0:
            return False
    return True


def _lies_in_fat(plane: np.ndarray, footprint: np.ndarray, image: np.ndarray) -> bool:
    """The tube and its fat plane lie in fat (mesentery, not across an organ), and its soft tissue covers no bone,
    kidney, aorta or gas."""
    under = image[footprint]
    return (image[plane] > -30).mean() <= 0.1 and not ((under > 150).any() or (under < -500).any())


def paint_matched_decoys(rng: np.random.Generator, count: int, scene: Scene) -> np.ndarray:
    """Paint up to `count` matched decoys into scene.image (fewer where the case has no room for them); returns the
    decoy mask: exactly the voxels painted pancreas-like for a decoy."""
    g, img = scene.grid, scene.image
    z_range = (float(g.axes[2][0]), float(g.axes[2][-1]))
    cavity = ((g.x / scene.cavity[0]) ** 2 + (g.y / scene.cavity[1]) ** 2 <= 1.0) & scene.body
    avoid = list(scene.avoid)  # grows by each decoy's reach
    decoys = np.zeros(g.shape, dtype=bool)
    for _ in range(count):
        for _ in range(TRIES):
            points, radii = _draw_curve(rng, z_range, scene.cavity)
            if not _fits(points, radii, scene, avoid):
                continue
            plane = g.tube(points, radii + FAT_PLANE_MM)
            footprint = g.tube(points, radii + FAT_PLANE_MM + NEIGHBOUR_MM) & cavity
            if _lies_in_fat(plane, footprint, img):
                break
        else:
            continue
        # A quadratic Bezier curve lies in one plane: the side of it (shifted a little) is a half-shell round the tube.
        normal = np.cross(points[-1] - points[0], points[len(points) // 2] - points[0])
        normal *= (1.0 if rng.random() < 0.5 else -1.0) / np.linalg.norm(normal)
        height = (g.x - points[0, 0]) * normal[0] + (g.y - points[0, 1]) * normal[1] + (g.z - points[0, 2]) * normal[2]
        neighbour = footprint & ~plane & (height > -NEIGHBOUR_OFFSET_MM)
        img[neighbour] = NEIGHBOUR_HU + NEIGHBOUR_TEXTURE * scene.texture[neighbour]
        fat = plane & scene.body
        img[fat] = HU["fat"] + 6 * scene.texture[fat]  # as the gland's fat plane
        decoy = g.tube(points, radii) & scene.body
        scene.paint_pancreas_like(decoy)
        decoys |= decoy
        avoid.append((points, radii + FAT_PLANE_MM + NEIGHBOUR_MM))
    return decoys
