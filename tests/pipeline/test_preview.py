"""`seg3d infer --preview` (pipeline/preview.py): one PNG per case, one row of three planes per structure found,
each structure outlined in its colour through its own centre; a structure not found is drawn nowhere."""

from __future__ import annotations

from pathlib import Path

import matplotlib.colors as mcolors
import nibabel as nib
import numpy as np
from PIL import Image

from pipeline.infer import run_inference
from pipeline.plots import COLOURS
from pipeline.preview import _centre, preview_png
from pipeline.statistics import structure_statistics
from tests.pipeline._ct_series import phantom_hu

NAMES = ["background", "liver", "pancreas", "spleen"]


def _pixels_of(png: Path, colour: str, tolerance: int = 40) -> int:
    """Pixels of the PNG within `tolerance` (per channel) of a colour."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    target = np.array([round(255 * c) for c in mcolors.to_rgb(colour)])
    return int((np.abs(rgb - target).max(axis=-1) <= tolerance).sum())


def _real_ct_with_organs(real_ct: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = nib.load(real_ct / "ct.nii.gz")
    labels = np.zeros(img.shape, np.uint8)
    for index, name in enumerate(NAMES[1:3], start=1):  # liver and pancreas; spleen left out: "not found"
        labels[np.asarray(nib.load(real_ct / "masks" / f"{name}.nii.gz").dataobj) > 0.5] = index
    return np.asarray(img.dataobj).astype(np.float32), labels, img.affine


def test_a_preview_outlines_each_structure_found_in_its_colour_and_no_other(real_ct, tmp_path):
    ct, labels, affine = _real_ct_with_organs(real_ct)
    rows = structure_statistics(ct, labels, affine, names=NAMES, values=[0, 1, 2, 3])
    png = preview_png(
        tmp_path / "case_preview.png",
        image=ct,
        labels=labels,
        affine=affine,
        names=NAMES,
        rows=rows,
        case="case",
        model="attention_unet",
    )
    image = Image.open(png)
    assert image.format == "PNG"
    width, height = image.size
    assert height > 0.75 * width, "two rows of three planes (liver, pancreas); one row is under half as tall"
    assert _pixels_of(png, COLOURS[0]) > 200, "the liver is outlined in the first colour"
    assert _pixels_of(png, COLOURS[1]) > 50, "the pancreas in the second"
    assert _pixels_of(png, COLOURS[2], tolerance=20) == 0, "the spleen was not found: nothing in its colour"


def test_the_planes_cross_at_a_voxel_of_the_structure_even_when_its_centre_of_mass_is_outside():
    labels = np.zeros((30, 30, 5), np.uint8)
    labels[5:25, 5:8, 2] = 1  # a C: two bars and a back
    labels[5:25, 22:25, 2] = 1
    labels[5:8, 5:25, 2] = 1
    centre = _centre(labels, 1)
    assert labels[centre] == 1
    mass = np.argwhere(labels == 1).mean(0).round().astype(int)
    assert labels[tuple(mass)] == 0, "the centre of mass lies in the C's opening"


def test_infer_writes_one_preview_per_case_beside_the_mask(bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(phantom_hu().astype(np.int16), np.diag([0.8, 0.8, 2.5, 1])), inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    summary = run_inference(bundle_dir, inputs, out, preview=True, progress=False)
    assert summary.done == ["a", "b"]
    for name in ("a", "b"):
        png = Image.open(out / f"{name}_preview.png")
        assert png.format == "PNG" and png.size[0] > 600, "three planes side by side"
    assert not (out / "overlays").exists()
