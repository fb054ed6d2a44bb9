from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.cli import main
from pipeline.errors import Seg3dError
from pipeline.synthetic import HU, CaseSpec, make_case, make_phantom, synthesize, to_nifti

SPEC = CaseSpec(shape=(96, 96, 40), spacing=(0.9, 0.9, 2.5), orientation="RAS", tumour=True, decoys=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    synthesize(out, cases=5, seed=3, test_cases=2)
    return out


def test_msd_layout_and_manifest(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "pancreas", "2": "cancer"}
    assert meta["seg3d_phantom"] == {"seed": 3, "decoys": "classic"}
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


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(array).tobytes()).hexdigest()[:16]


# Recorded before the decoy masks were added (issue 13): writing where the decoys are must not change a voxel of any
# image or label, since the tests and the published benchmark numbers were measured on them.
BEFORE_DECOY_MASKS = {
    ("SPEC", 0): ("fba491c5c6c78f3a", "1dfe1abfe469d464"),
    ("SPEC", 5): ("fcc4816e3fdca662", "c565227c3b0fa781"),
    # seed 3 as the `dataset` fixture writes them, in stored voxel order (pancreas_002 is stored LPS)
    ("Tr", "pancreas_001"): ("c3cd770d8623c7d3", "29f37f1a0ac70991"),
    ("Tr", "pancreas_002"): ("2d5dbbb6e12dedb5", "80fd215ee57ba802"),
    ("Tr", "pancreas_003"): ("3bb3d0587f4d4632", "918459df399cec64"),
}


def test_images_and_labels_are_those_drawn_before_the_decoy_masks(dataset):
    for (where, key), (image_sha, label_sha) in BEFORE_DECOY_MASKS.items():
        if where == "SPEC":
            image, label, affine = make_phantom(np.random.default_rng([key, 0]), SPEC)
            case = make_case(np.random.default_rng([key, 0]), SPEC)
            for a, b in zip((image, label, affine), case[:3]):
                np.testing.assert_array_equal(a, b)
        else:
            image = nib.load(dataset / f"images{where}" / f"{key}.nii.gz").dataobj
            label = nib.load(dataset / f"labels{where}" / f"{key}.nii.gz").dataobj
        assert (_sha(image), _sha(label)) == (image_sha, label_sha), (where, key)


def test_decoy_masks_are_written_in_the_image_geometry_and_listed(dataset):
    meta = json.loads((dataset / "dataset.json").read_text())
    pairs = [(e["image"], e["decoy"]) for e in meta["training"]]
    pairs += [(p, p.replace("imagesTs", "decoysTs")) for p in meta["test"]]  # found by name, as labelsTs
    assert [d for _, d in pairs[:2]] == ["./decoysTr/pancreas_001.nii.gz", "./decoysTr/pancreas_002.nii.gz"]
    decoy_voxels = []
    for image_path, decoy_path in pairs:
        image, mask = nib.load(dataset / image_path), nib.load(dataset / decoy_path)
        label = nib.load(dataset / image_path.replace("images", "labels"))
        assert mask.get_data_dtype() == np.uint8 and mask.shape == image.shape
        np.testing.assert_array_equal(mask.affine, image.affine)  # the same to_nifti path, the same orientation
        assert int(mask.header["qform_code"]) == 1 and int(mask.header["sform_code"]) == 1
        values = np.asarray(mask.dataobj)
        assert set(np.unique(values)) <= {0, 1}
        assert not (values.astype(bool) & (np.asarray(label.dataobj) > 0)).any(), "a decoy voxel is labelled"
        decoy_voxels.append(int(values.sum()))
    assert sum(v > 0 for v in decoy_voxels) >= len(pairs) - 1, f"decoys missing from the masks: {decoy_voxels}"


def test_decoy_mask_covers_pancreas_like_tissue_where_no_label_is():
    case = make_case(np.random.default_rng(5), SPEC)
    without = make_case(np.random.default_rng(5), replace(SPEC, decoys=0))
    assert case.decoys.dtype == np.uint8 and not without.decoys.any()
    mask = case.decoys.astype(bool)
    assert mask.sum() > 100 and not (mask & (case.label > 0)).any()
    core = ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool))
    pancreas_core = ndimage.binary_erosion(case.label == 1, np.ones((3, 3, 1), bool))
    assert abs(np.median(case.image[core]) - np.median(case.image[pancreas_core])) < 20
    # The same seed without decoys differs only where the mask is (widened by the partial-volume blur): the mask is
    # where the decoys were painted, not a guess at them.
    changed = np.abs(case.image.astype(float) - without.image) > 40
    assert changed.sum() > 100
    assert not (changed & ~ndimage.binary_dilation(mask, iterations=2)).any()


def test_cli_synth_and_refusal_to_overwrite(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases", "1", "--test-cases", "1"]) == 0
    assert (tmp_path / "d" / "dataset.json").exists()
    assert main(["synth", "--out", str(tmp_path / "d"), "--cases", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]


# Matched decoys (`seg3d synth --decoys matched`): the classic decoys differ from the gland locally (a third of its
# size, plain fat round them); matched ones must not, and must leave the rest of the case as classic draws it.


@pytest.fixture(scope="module")
def classic_and_matched():
    return tuple(make_case(np.random.default_rng(5), SPEC, decoys=kind) for kind in ("classic", "matched"))


def _shell_hu(case, region: np.ndarray, lo_mm: float, hi_mm: float) -> float:
    """Mean HU lo..hi mm outside `region`, leaving out labelled and decoy tissue (as benchmarks/phantom_context)."""
    outside_mm = ndimage.distance_transform_edt(~region, sampling=SPEC.spacing)
    shell = (outside_mm > lo_mm) & (outside_mm <= hi_mm) & (case.label == 0) & (case.decoys == 0)
    return float(case.image[shell].mean())


def test_matched_decoys_are_whole_glands_in_the_image_geometry_clear_of_the_gland(classic_and_matched):
    classic, matched = classic_and_matched
    mask = matched.decoys
    assert mask.dtype == np.uint8 and mask.shape == matched.image.shape and set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(matched.label, classic.label)  # the gland is not repainted
    np.testing.assert_array_equal(matched.affine, classic.affine)
    # Apart from the gland, with its fat plane between: not even a voxel's neighbour of a decoy is labelled.
    assert not (ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool)) & (matched.label > 0)).any()
    gland = int((matched.label > 0).sum())
    pieces, n = ndimage.label(mask)
    sizes = np.bincount(pieces.ravel())[1:]
    assert n >= 2, "matched decoys missing"
    assert all(0.6 * gland <= v <= 1.6 * gland for v in sizes), (gland, sizes)  # each the size of the gland...
    classic_sizes = np.bincount(ndimage.label(classic.decoys)[0].ravel())[1:]
    assert all(v < 0.5 * gland for v in classic_sizes), (gland, classic_sizes)  # ...where classic ones are a third
    # Exactly the voxels painted pancreas-like: their core has the gland's parenchymal HU.
    core = ndimage.binary_erosion(mask, np.ones((3, 3, 1), bool))
    pancreas_core = ndimage.binary_erosion(matched.label == 1, np.ones((3, 3, 1), bool))
    assert abs(np.median(matched.image[core]) - np.median(matched.image[pancreas_core])) < 20


def test_matched_decoys_have_the_gland_s_surroundings_and_classic_ones_do_not(classic_and_matched):
    """3-6 mm outside the edge, the gland has organs beyond its fat plane (about +5 HU on average); classic decoys
    have plain fat (about -100 HU); matched ones must be within 20 HU of the gland."""
    classic, matched = classic_and_matched
    gland = _shell_hu(matched, matched.label == 1, 3.0, 6.0)
    assert abs(_shell_hu(matched, matched.decoys > 0, 3.0, 6.0) - gland) < 20
    assert _shell_hu(classic, classic.decoys > 0, 3.0, 6.0) < gland - 60
    # Their thin fat plane as the gland's: just outside the edge it is fattier than farther out, as for the gland.
    assert _shell_hu(matched, matched.decoys > 0, 0.0, 1.5) < _shell_hu(matched, matched.decoys > 0, 3.0, 6.0) - 30


def test_matched_mode_changes_only_the_decoys_neighbourhood(classic_and_matched):
    """Same seed: anatomy and noise come from their own streams, so the images are equal voxel for voxel except near
    the decoys of either mode: up to 24 body mm (fat plane + soft tissue) beyond a matched decoy, widened by the
    partial-volume blur (2 voxels)."""
    classic, matched = classic_and_matched
    scale_max = SPEC.shape[0] * SPEC.spacing[0] / 360.0 * 1.05  # world mm per body mm, at most
    reach = ndimage.distance_transform_edt(matched.decoys == 0, sampling=SPEC.spacing) <= 24.0 * scale_max
    near = ndimage.binary_dilation(reach | (classic.decoys > 0), np.ones((3, 3, 3), bool), iterations=2)
    changed = matched.image != classic.image
    assert changed.sum() > 1000 and near.mean() < 0.3
    assert not (changed & ~near).any()
    # Without decoys the two modes are the same case.
    empty = [make_case(np.random.default_rng(5), replace(SPEC, decoys=0), decoys=k) for k in ("classic", "matched")]
    np.testing.assert_array_equal(empty[0].image, empty[1].image)
    np.testing.assert_array_equal(empty[0].image, make_phantom(np.random.default_rng(5), replace(SPEC, decoys=0))[0])


def test_cli_synth_matched_records_the_choice(tmp_path):
    out = tmp_path / "m"
    assert main(["synth", "--out", str(out), "--cases", "1", "--test-cases", "0", "--decoys", "matched"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seg3d_phantom"] == {"seed": 0, "decoys": "matched"} and "matched" in meta["description"]
    entry = meta["training"][0]
    image, mask = nib.load(out / entry["image"]), nib.load(out / entry["decoy"])
    np.testing.assert_array_equal(mask.affine, image.affine)
    values, label = np.asarray(mask.dataobj), np.asarray(nib.load(out / entry["label"]).dataobj)
    assert values.sum() > 100 and not (values.astype(bool) & (label > 0)).any()
    with pytest.raises(Seg3dError, match="--decoys must be one of classic, matched"):
        synthesize(tmp_path / "x", cases=1, decoys="hard")
