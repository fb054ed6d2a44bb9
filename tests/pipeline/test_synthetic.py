from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.cli import main
from pipeline.synthetic import HU, CaseSpec, make_phantom, synthesize, to_nifti

SPEC = CaseSpec(shape=(96, 96, 40), spacing=(0.9, 0.9, 2.5), orientation="RAS", tumour=True, decoys=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    synthesize(out, cases=5, seed=3, test_cases=2)
    return out


def test_msd_layout_and_manifest(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}
    assert meta["modality"] == {"0": "CT"}
    assert meta["numTraining"] == 5 and meta["numTest"] == 2
    for entry in meta["training"]:
        image = nib.load(dataset / entry["image"])
        label = nib.load(dataset / entry["label"])
        assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2}
        assert (np.asarray(label.dataobj) == 1).sum() > 100, entry["label"]
    assert [p.split("/")[-1] for p in meta["test"]] == ["pancreas_006.nii.gz", "pancreas_007.nii.gz"]
    assert all((dataset / p).exists() for p in meta["test"])
    assert not list(dataset.rglob("*.tmp*")), "temporary files left behind"


def test_spacing_is_anisotropic_and_header_orientation_is_honest(dataset):
    codes, spacings = set(), []
    for path in sorted((dataset / "imagesTr").glob("*.nii.gz")) + sorted((dataset / "imagesTs").glob("*.nii.gz")):
        img = nib.load(path)
        codes.add("".join(nib.aff2axcodes(img.affine)))
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
        spacings.append(img.header.get_zooms())
    assert codes >= {"RAS"} and codes - {"RAS"}, f"every case is RAS: {codes}"
    for sx, sy, sz in spacings:
        assert 0.6 <= sx <= 1.0 and sx == pytest.approx(sy) and 1.5 <= sz <= 5.0


@pytest.mark.parametrize("orientation", ["LPS", "LAS"])
def test_non_ras_storage_is_the_same_anatomy(orientation):
    """Stored in LPS or LAS, the case brought back to RAS is voxel for voxel the RAS case, same affine."""
    image, _, affine = make_phantom(np.random.default_rng(0), SPEC)
    ras = nib.as_closest_canonical(to_nifti(image, affine, "RAS"))
    other = to_nifti(image, affine, orientation)
    assert "".join(nib.aff2axcodes(other.affine)) == orientation
    back = nib.as_closest_canonical(other)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(ras.dataobj))
    np.testing.assert_allclose(back.affine, ras.affine, atol=1e-6)


def test_deterministic_per_seed():
    a = make_phantom(np.random.default_rng([7, 0]), SPEC)
    b = make_phantom(np.random.default_rng([7, 0]), SPEC)
    c = make_phantom(np.random.default_rng([8, 0]), SPEC)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_ct_like_intensities():
    image, label, _ = make_phantom(np.random.default_rng(1), SPEC)
    assert np.median(image[:3, :3, :]) < -900, "corners are air"
    # Inside the gland (away from the partial-volume rim against the peripancreatic fat) it is parenchyma.
    core = ndimage.binary_erosion(label > 0, np.ones((3, 3, 1), bool)) & (label == 1)
    assert abs(np.median(image[core]) - HU["pancreas"]) < 25
    rim = (label == 1) & ~core
    assert np.median(image[rim]) < np.median(image[core]) - 10, "no fat plane around the gland"
    assert abs(np.median(image[label == 2]) - HU["tumour"]) < 25, "tumour is hypodense"
    assert image.max() > 600, "bone present"


def test_decoys_look_like_pancreas_but_are_not_labelled():
    with_decoys = make_phantom(np.random.default_rng(5), SPEC)
    without = make_phantom(np.random.default_rng(5), replace(SPEC, decoys=0))
    np.testing.assert_array_equal(with_decoys[1], without[1])  # labels untouched
    changed = np.abs(with_decoys[0].astype(float) - without[0]) > 40
    assert changed.sum() > 100, "decoys are missing"
    decoy_hu = with_decoys[0][changed & (with_decoys[1] == 0)]
    pancreas_hu = with_decoys[0][with_decoys[1] == 1]
    assert abs(np.median(decoy_hu) - np.median(pancreas_hu)) < 30


def test_cli_synth_and_refusal_to_overwrite(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases", "1", "--test-cases", "1"]) == 0
    assert (tmp_path / "d" / "dataset.json").exists()
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
