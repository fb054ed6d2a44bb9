"""Writers: the DICOM SEG's segment coding and pixels, read back with pydicom and highdicom; the NIfTI label map
written from the input's header as read, compressed or not as its name says. (The NIfTI and probability writers'
geometry is tested end to end in test_infer.py.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.imageio import read_volume
from pipeline.predict import Prediction
from pipeline.transforms import Preprocessing
from pipeline.writers import ANATOMICAL_STRUCTURE, dicom_seg_sources, segment_codes, write_dicom_seg, write_labels
from tests.pipeline.conftest import PRE
from tests.pipeline.test_infer import _series_with_uids

ANATOMICAL = ("91723000", "SCT", "Anatomical Structure")  # SNOMED CT, DICOM CID 7150
ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")


def _pre(names: list[str]) -> Preprocessing:
    return replace(PRE, label_names=names, label_values=list(range(len(names))))


def _code(item) -> tuple[str, str, str]:
    return str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning)


def test_dicom_seg_codes_an_organ_as_anatomy_and_a_tumour_as_abnormal_and_keeps_the_labels(real_ct, tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    series = _series_with_uids(real_ct, tmp_path / "series")
    labels = np.zeros((512, 512, 20), np.uint8)  # (x, y, z) of the series
    labels[200:260, 220:280, 5:12] = 1
    labels[220:235, 240:250, 7:10] = 2
    labels[300:320, 100:130, 14:16] = 3
    names = ["background", "pancreas", "cancer", "liver"]
    affine = np.eye(4)  # not used by the SEG: it takes its geometry from the source series
    out = write_dicom_seg(
        Prediction(labels, affine), _pre(names), series=series, out=tmp_path / "seg.dcm", model_name="attention_unet"
    )

    ds = pydicom.dcmread(out)
    segments = {s.SegmentLabel: s for s in ds.SegmentSequence}
    assert list(segments) == names[1:]
    category = {k: _code(s.SegmentedPropertyCategoryCodeSequence[0]) for k, s in segments.items()}
    kind = {k: _code(s.SegmentedPropertyTypeCodeSequence[0]) for k, s in segments.items()}
    assert category == {"pancreas": ANATOMICAL, "cancer": ABNORMAL, "liver": ANATOMICAL}
    assert kind["pancreas"] == ("15776009", "SCT", "Pancreas")
    assert kind["cancer"] == ("108369006", "SCT", "Neoplasm")
    assert kind["liver"] == ANATOMICAL, "a class without an entry is an anatomical structure of unspecified type"
    # The codes are DICOM's own (pydicom's code dictionary), not spellings of our own.
    for concept, expected in [
        (codes.cid7150.AnatomicalStructure, ANATOMICAL),
        (codes.cid7150.MorphologicallyAbnormalStructure, ABNORMAL),
        (codes.SCT.Pancreas, kind["pancreas"]),
        (codes.SCT.Neoplasm, kind["cancer"]),
    ]:
        assert (concept.value, concept.scheme_designator, concept.meaning) == expected

    # Segment i holds exactly the voxels of class i, frame by frame in the series' z order.
    uids = [s.SOPInstanceUID for s in dicom_seg_sources(series)]
    pixels = hd.seg.segread(out).get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(pixels, labels.transpose(2, 1, 0))


@pytest.mark.parametrize(
    ("name", "category", "kind"),
    [("Pancreas", "91723000", "15776009"), ("TUMOUR", "49755003", "108369006"), ("tumor", "49755003", "108369006")],
)
def test_segment_codes_are_looked_up_by_name_in_any_case(name, category, kind):
    assert (segment_codes(name)[0].value, segment_codes(name)[1].value) == (category, kind)
    assert segment_codes("spleen") == (ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE)


# -- NIfTI label maps: written from the header as read, compressed as the name says ----------------------------------


def _read_prediction(path: Path, unit: str = "mm") -> Prediction:
    """A NIfTI input in `unit`, read as inference reads it, and a label map on its grid."""
    affine = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    affine[:3] /= {"meter": 1000.0, "mm": 1.0}[unit]
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3) - 1000, affine)
    img.header.set_xyzt_units(unit)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, path)
    volume = read_volume(path, case="c1")
    return Prediction((volume.array > -990).astype(np.uint8), volume.affine, source=volume.source)


@pytest.mark.parametrize("name, gzipped", [("out.nii", False), ("out.nii.gz", True), ("OUT.NII", False)])
def test_a_label_map_is_compressed_exactly_when_its_name_says_so(tmp_path, name, gzipped):
    pred = _read_prediction(tmp_path / "in.nii.gz")
    out = write_labels(pred, _pre(["background", "organ"]), out=tmp_path / name)
    head = out.read_bytes()[:348]
    assert (head[:2] == b"\x1f\x8b") is gzipped
    if not gzipped:
        assert head[344:348] == b"n+1\x00" and int.from_bytes(head[:4], "little") == 348  # NIfTI-1, one file
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), pred.labels)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "a temporary was left"


def test_the_label_map_is_written_from_the_header_as_read_even_when_the_input_is_gone(tmp_path):
    """The writer never reads the input again: the input deleted (or replaced) after the read changes nothing, and a
    header in metres gives a label map in metres that overlays the input exactly."""
    source = tmp_path / "in.nii.gz"
    pred = _read_prediction(source, unit="meter")
    before = nib.load(source)
    source.unlink()
    out = write_labels(pred, _pre(["background", "organ"]), out=tmp_path / "out.nii.gz")
    img = nib.load(out)
    assert img.header.get_xyzt_units()[0] == "meter"
    np.testing.assert_allclose(img.affine, before.affine, atol=1e-9)
    for code in ("qform_code", "sform_code"):
        assert int(img.header[code]) == int(before.header[code])
    np.testing.assert_allclose(read_volume(out, kind="label").affine, pred.affine, atol=1e-6)  # the same mm
    assert img.get_data_dtype() == np.uint8


def test_a_label_map_of_a_dicom_series_gets_a_mm_header_from_its_affine(tmp_path):
    affine = np.array([[-0.98, 0, 0, 249.5], [0, -0.98, 0, 437.5], [0, 0, 2.0, -804.5], [0, 0, 0, 1]])
    pred = Prediction(np.zeros((4, 3, 2), np.uint8), affine)
    img = nib.load(write_labels(pred, _pre(["background", "organ"]), out=tmp_path / "out.nii"))
    assert img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
