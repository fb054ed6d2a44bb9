"""`seg3d infer --preview`: one PNG per case that a person reads at a glance.

One row per structure the model segments: axial, coronal and sagittal planes through that structure's centre, the
CT in a soft-tissue window with the structure outlined, and above the row its name, volume and mean HU (from the
case's statistics); a structure the model did not find says so in a row of its own. The title names the case and the
model, with "not for diagnostic use". The planes are shown as a radiologist reads them (pipeline/plots.py: patient's
right on the viewer's left, anterior up, superior up) with the voxel spacing as aspect ratio. matplotlib is imported
only when a preview is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.fileio import atomic_write

PLANES = ("axial", "coronal", "sagittal")


def preview_png(
    path: Path,
    *,
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    names: list[str],
    rows: list[dict],
    case: str,
    model: str,
) -> Path:
    """`labels`: class indices on `image`'s grid; `rows`: the case's statistics (pipeline.statistics), one per
    foreground class, in the order of `names[1:]`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; select before pyplot is imported
    import matplotlib.pyplot as plt

    from pipeline.plots import COLOURS, WINDOW, _to_ras, _views

    ct, spacing = _to_ras(image.astype(np.float32), affine)
    classes = _to_ras(labels, affine)[0]
    sx, sy, sz = spacing
    aspects = [sy / sx, sz / sx, sz / sy]
    found = [i for i in range(1, len(names)) if rows[i - 1]["voxels"] > 0]
    missing = [names[i] for i in range(1, len(names)) if i not in found]
    count = max(len(found), 1)
    fig = plt.figure(figsize=(12, 4.4 * count + 0.6))
    rows_of = fig.subfigures(count, 1, squeeze=False)[:, 0]
    for sub, index in zip(rows_of, found or [0]):
        centre = _centre(classes, index) if index else tuple(s // 2 for s in ct.shape)
        colour = COLOURS[(index - 1) % len(COLOURS)] if index else "black"
        axes = sub.subplots(1, 3)
        for ax, plane, view, mask, aspect in zip(
            axes, PLANES, _views(ct, centre), _views(classes == index, centre), aspects
        ):
            ax.imshow(view, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect)
            if index and mask.any() and min(mask.shape) > 1:
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.4)
            ax.set_title(plane, fontsize=9)
            ax.axis("off")
        headline = _headline(rows[index - 1]) if index else "no structure found"
        sub.suptitle(headline, fontsize=13, fontweight="bold", color=colour, path_effects=_outline())
    title = f"{case}: seg3d {model}, not for diagnostic use"
    if missing:
        title += "\nnot found: " + ", ".join(missing)
    fig.suptitle(title, fontsize=11, y=1.0, va="bottom")
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png", bbox_inches="tight"), suffix=".png")
    plt.close(fig)
    return Path(path)


def _headline(row: dict) -> str:
    hu = f", mean {row['hu_mean']:.0f} HU" if row.get("hu_mean") is not None else ""
    return f"{row['structure']}: {row['volume_ml']:.1f} ml{hu}"


def _centre(classes: np.ndarray, index: int) -> tuple[int, int, int]:
    """The voxel nearest the structure's centre of mass, moved onto the structure if the centre falls outside it
    (a C-shaped organ): the planes then cut through the structure itself."""
    where = np.argwhere(classes == index)
    centre = where.mean(axis=0)
    nearest = where[np.argmin(((where - centre) ** 2).sum(axis=1))]
    return tuple(int(v) for v in nearest)


def _outline():
    """A thin dark edge, so that a light structure colour (yellow) still reads on the white page."""
    import matplotlib.patheffects as effects

    return [effects.withStroke(linewidth=1.0, foreground="#333333")]
