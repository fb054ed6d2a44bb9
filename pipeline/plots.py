"""PNG figures: overlays of a CT with reference and predicted masks, and training curves.

Overlays are shown in radiological convention (patient's right on the viewer's left, anterior up on axial
slices, superior up on coronal and sagittal ones) with the voxel spacing as aspect ratio, through the centre of
the structure of interest, in a soft-tissue window (W400 L40).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; select before pyplot is imported
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

from pipeline.fileio import atomic_write

WINDOW = (-160.0, 240.0)
COLOURS = ["#00d0ff", "#ff3030", "#ffd000", "#40ff40", "#ff40ff"]


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def _views(a: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    x, y, z = centre
    return [a[::-1, :, z].T, a[::-1, y, :].T, a[x, ::-1, :].T]  # axial, coronal, sagittal (rows upwards)


def overlay_png(
    path: Path,
    image: np.ndarray,
    affine: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    label_names: list[str],
    title: str = "",
    extra: np.ndarray | None = None,
    extra_name: str = "",
) -> Path:
    """Three orthogonal slices through the reference foreground (or the prediction, or the centre).

    Reference contours are solid, predicted ones dashed; `extra` (e.g. an attention-gate map in [0, 1]) is a
    fourth row drawn as a heat map over the CT."""
    ct, spacing = _to_ras(image.astype(np.float32), affine)
    ref = _to_ras(reference, affine)[0] if reference is not None else None
    pred = _to_ras(prediction, affine)[0] if prediction is not None else None
    heat = _to_ras(extra.astype(np.float32), affine)[0] if extra is not None else None
    focus = next((m for m in (ref, pred) if m is not None and (m > 0).any()), None)
    centre = (
        tuple(round(float(c)) for c in np.argwhere(focus > 0).mean(0))
        if focus is not None
        else tuple(s // 2 for s in ct.shape)
    )
    sx, sy, sz = spacing
    aspects = [sy / sx, sz / sx, sz / sy]
    names = ["axial", "coronal", "sagittal"]
    rows = 2 if heat is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4.4 * rows), squeeze=False)
    for col, (view, aspect) in enumerate(zip(_views(ct, centre), aspects)):
        ax = axes[0, col]
        ax.imshow(view, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect)
        for mask, style in ((ref, "solid"), (pred, "dashed")):
            if mask is None:
                continue
            m = _views(mask, centre)[col]
            if min(m.shape) < 2:
                continue  # a view across a one-slice image: a line, nothing to outline (the other views show it)
            for cls in range(1, len(label_names)):
                if (m == cls).any():
                    ax.contour(
                        m == cls,
                        levels=[0.5],
                        colors=COLOURS[(cls - 1) % len(COLOURS)],
                        linestyles=style,
                        linewidths=1.2,
                    )
        ax.set_title(names[col])
        ax.axis("off")
        if heat is not None:
            hx = axes[1, col]
            hx.imshow(view, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect)
            hx.imshow(_views(heat, centre)[col], cmap="jet", alpha=0.45, vmin=0, vmax=1, origin="lower", aspect=aspect)
            hx.set_title(f"{names[col]}: {extra_name}")
            hx.axis("off")
    legend = [f"{n} ({COLOURS[(i - 1) % len(COLOURS)]})" for i, n in enumerate(label_names) if i > 0]
    styles = ", ".join(s for s, m in (("reference solid", ref), ("prediction dashed", pred)) if m is not None)
    fig.suptitle(f"{title}\n{styles}; " + ", ".join(legend), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path


def curves_png(path: Path, history: list[dict], class_names: list[str]) -> Path:
    """Training loss and validation Dice (per class and mean) against the epoch."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [h["epoch"] + 1 for h in history]  # 1-based for people; MLflow steps stay 0-based
    left.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    validated = [h for h in history if "val_dice_mean" in h]
    val_epochs = [h["epoch"] + 1 for h in validated]
    for name in class_names[1:]:
        right.plot(val_epochs, [h.get(f"val_dice_{name}", np.nan) for h in validated], label=name)
    right.plot(val_epochs, [h["val_dice_mean"] for h in validated], "k--", label="mean")
    right.set_xlabel("epoch")
    right.set_ylabel("validation Dice")
    right.set_ylim(0, 1)
    right.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
    return path
