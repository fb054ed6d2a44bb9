"""Writers: every output of a prediction in the input's own geometry, written atomically.

- NIfTI label map (uint8, the training label values) with the source NIfTI's own header, as it was read (the input
  is never read again to write it), compressed for a .nii.gz name and not for a .nii name;
- class probabilities as float16 in a .npz (NIfTI has no float16 type);
- a DICOM Segmentation object referencing the source series, one segment per foreground class, each coded as
  DICOM PS3.16 asks: a segmented property category (CID 7150) and type (SNOMED CT) from `SEGMENT_CODES`.

pydicom, highdicom and SimpleITK are imported only when a DICOM SEG is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write
from pipeline.imageio import fortran_ordered

if TYPE_CHECKING:
    from pipeline.imageio import SourceFile
    from pipeline.predict import Prediction
    from pipeline.transforms import Preprocessing


def nifti_suffix(path: Path) -> str:
    """The suffix that makes nibabel write what the name says: plain NIfTI for .nii, gzip for anything else."""
    return ".nii" if Path(path).name.lower().endswith(".nii") else ".nii.gz"


def _save_nifti(array: np.ndarray, *, header, affine: np.ndarray, out: Path, dtype) -> Path:
    """Save with the source NIfTI's header as read (qform and sform with their codes, units), so the output has
    exactly its geometry, in its units; without one (a DICOM series), a header made from the RAS mm affine."""
    array = fortran_ordered(array)
    if header is not None:
        header = header.copy()
        img = nib.Nifti1Image(array, None, header=header)
        img.set_qform(header.get_qform(), code=int(header["qform_code"]))
        img.set_sform(header.get_sform(), code=int(header["sform_code"]))
    else:
        img = nib.Nifti1Image(array, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    # nibabel compresses by the file name: the temporary's suffix decides what lands under the output's name.
    atomic_write(out, lambda tmp: nib.save(img, tmp), suffix=nifti_suffix(out))
    return out


def label_values(labels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Class indices -> the values the training label files used (pancreas=7 for a TotalSegmentator selection)."""
    if pre.label_values == list(range(pre.num_classes)):
        return labels.astype(np.uint8, copy=False)
    lut = np.asarray(pre.label_values, dtype=np.uint8)
    return lut[labels]


def write_labels(prediction: Prediction, pre: Preprocessing, *, out: Path) -> Path:
    """uint8 label map with the training label values, in exactly the geometry of the input as it was read."""
    values = label_values(prediction.labels, pre)
    header = prediction.source.header if prediction.source is not None else None
    return _save_nifti(values, header=header, affine=prediction.affine, out=out, dtype=np.uint8)


def write_probabilities(prediction: Prediction, pre: Preprocessing, out: Path) -> Path:
    """Class probabilities as float16 (K, X, Y, Z) in the input's voxel grid, in a .npz with the affine and the
    class names (as nnU-Net does: NIfTI has no float16 type). Read it with np.load(path) (no pickle needed)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                probabilities=prediction.probabilities.astype(np.float16),
                affine=prediction.affine,
                classes=np.asarray(pre.label_names),
            )

    atomic_write(out, write, suffix=".npz")
    return out


# -- DICOM SEG ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A coded concept (value, meaning) of SNOMED CT, as DICOM writes it with the scheme designator "SCT"."""

    value: str
    meaning: str
    scheme: str = "SCT"


ANATOMICAL_STRUCTURE = Code("91723000", "Anatomical Structure")  # CID 7150 category of an organ
ABNORMAL_STRUCTURE = Code("49755003", "Morphologically Abnormal Structure")  # CID 7150 category of a lesion
NEOPLASM = (ABNORMAL_STRUCTURE, Code("108369006", "Neoplasm"))

# Class name (any case) -> (segmented property category, segmented property type). A class not listed here is an
# anatomical structure of unspecified type: right for the organs a label selection usually holds, and a reader
# still sees the segment label. A new structure is one line here.
SEGMENT_CODES: dict[str, tuple[Code, Code]] = {
    "pancreas": (ANATOMICAL_STRUCTURE, Code("15776009", "Pancreas")),
    "cancer": NEOPLASM,
    "tumour": NEOPLASM,
    "tumor": NEOPLASM,
}


def segment_codes(name: str) -> tuple[Code, Code]:
    """(segmented property category, segmented property type) of the class `name`."""
    return SEGMENT_CODES.get(name.lower(), (ANATOMICAL_STRUCTURE, ANATOMICAL_STRUCTURE))


def dicom_seg_sources(series: Path, expect: SourceFile | None = None, case: str | None = None) -> list:
    """The series' datasets in the volume's z order (GDCM's sorting), checked for what a SEG must reference.

    Some anonymisers blank SOPClassUID/SOPInstanceUID in the data set while the file meta header keeps them;
    those are taken from the meta header. Blank study or series UIDs cannot be recovered: refused up front, before
    any compute, since a SEG that references nothing is useless to a PACS. With `expect` (the series as its voxels
    were read), the files must be those very files, unchanged before and after this read: a SEG references the
    slices that were segmented, not a series copied over them since."""
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(series), reader.GetGDCMSeriesIDs(str(series))[0])
    if expect is not None:
        if tuple(str(f) for f in files) != expect.files:
            raise expect.changed(case)
        expect.check_unchanged(case)
    sources = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=False)
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID") and meta is not None and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta is not None and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        missing = [
            k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)
        ]
        if missing:
            raise Seg3dError(
                f"DICOM series {series} has no {', '.join(missing)} (in {Path(f).name}); a DICOM SEG or RTSTRUCT must "
                "reference its source by these UIDs, so --dicom-seg and --dicom-rtstruct cannot be used with it (the "
                "NIfTI output can)"
            )
        sources.append(ds)
    if expect is not None:
        expect.check_unchanged(case)
    return sources


def write_dicom_seg(
    prediction: Prediction,
    pre: Preprocessing,
    *,
    out: Path,
    model_name: str,
    series: Path | None = None,
    sources: list | None = None,
) -> Path:
    """A DICOM Segmentation object referencing the source series, one segment per foreground class. `sources`: the
    series' datasets as dicom_seg_sources read them (checked against the prediction's source), else read here from
    `series`, checked likewise."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from pipeline import __version__

    if series is None and prediction.source is not None:
        series = prediction.source.path
    if sources is None:
        sources = dicom_seg_sources(series, expect=prediction.source)
    mask = np.ascontiguousarray(prediction.labels.transpose(2, 1, 0))  # (x, y, z) -> (frames, rows, columns)
    if mask.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise Seg3dError(f"prediction {mask.shape} does not match the DICOM series in {series}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"seg3d {model_name}", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, name in enumerate(pre.label_names[1:], start=1):
        category, kind = segment_codes(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=hd.sr.CodedConcept(category.value, category.scheme, category.meaning),
                segmented_property_type=hd.sr.CodedConcept(kind.value, kind.scheme, kind.meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="seg3d",
        manufacturer_model_name=model_name,
        software_versions=__version__,
        device_serial_number="none",
        omit_empty_frames=False,
    )
    atomic_write(out, lambda tmp: seg.save_as(tmp), suffix=".dcm")
    return out
