"""Writers: the DICOM SEG's segment coding and pixels, read back with pydicom and highdicom. (The NIfTI and
probability writers' geometry is tested end to end in test_infer.py.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.predict import Prediction
from pipeline.transforms import Preprocessing
from pipeline.writers import ANATOMICAL_STRUCTURE, dicom_seg_sources, segment_codes, write_dicom_seg
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
