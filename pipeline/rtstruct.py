"""`seg3d infer --dicom-rtstruct`: the structures as a DICOM RT Structure Set, the object radiotherapy planning
systems read (they read contours, not DICOM SEG), referencing the slices of the source series.

The contours are made by rt-utils (Qurit's RTSTRUCT library: OpenCV's border following on each slice, the points
at the centres of the structure's boundary voxels, mapped to patient coordinates by the series' own geometry), so
filling them again gives the mask back, up to the voxels a one-voxel-wide neck or a hole's rim touches. seg3d then
completes what rt-utils leaves out or fills with its own name, so that dicom3tools' `dciodvfy` finds no error: the
Type 2 attributes of the General Study, RT Series and Frame of Reference modules, the equipment (seg3d and the
model), the ROI generation algorithm (AUTOMATIC) and each ROI's interpreted type.

rt-utils computes the in-plane step from PixelSpacing[0] for both axes, which is right for square pixels only;
a series with non-square pixels is refused before any compute, and every RTSTRUCT is checked against the
prediction's own geometry before it is written. rt-utils, pydicom and OpenCV are imported only here.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write
from pipeline.imageio import LPS_TO_RAS
from pipeline.writers import ANATOMICAL_STRUCTURE, segment_codes

if TYPE_CHECKING:
    from pipeline.predict import Prediction
    from pipeline.transforms import Preprocessing

# Type 2 attributes (present, may be empty) that rt-utils does not write: copied from the series when it has them.
_FROM_SERIES = ("ReferringPhysicianName", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
GEOMETRY_TOL_MM = 0.01


def check_rtstruct_sources(sources: list, series: Path, case: str | None = None) -> None:
    """Before any compute: the series can carry an RTSTRUCT that rt-utils places right (square pixels, one frame of
    reference)."""
    spacing = [float(v) for v in sources[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-4 * max(spacing):
        raise Seg3dError(
            f"DICOM series {series} has non-square pixels ({spacing[0]:g} x {spacing[1]:g} mm), which the RTSTRUCT "
            "writer (rt-utils) would place wrongly: --dicom-rtstruct refused for it; --dicom-seg works",
            case=case,
        )
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in sources}
    if len(frames) != 1 or not next(iter(frames)):
        raise Seg3dError(
            f"DICOM series {series} has {'no' if frames == {''} else 'more than one'} FrameOfReferenceUID; an RTSTRUCT"
            " places its contours in the series' frame of reference: --dicom-rtstruct refused for it",
            case=case,
        )


def write_rtstruct(prediction: Prediction, pre: Preprocessing, *, sources: list, out: Path, model_name: str) -> Path:
    """An RT Structure Set with one ROI per foreground class (empty ones included, so that a planning system sees
    that the model looked for them), referencing `sources`: the series' datasets in the volume's z order
    (pipeline.writers.dicom_seg_sources)."""
    from rt_utils import ds_helper, image_helper
    from rt_utils.rtstruct import RTStruct

    from pipeline import __version__

    labels = prediction.labels
    if labels.shape != (int(sources[0].Columns), int(sources[0].Rows), len(sources)):
        raise Seg3dError(f"prediction {labels.shape} does not match the DICOM series of {len(sources)} slices")
    for ds in sources:  # rt-utils reads these from the first slice without a default
        for key in _FROM_SERIES:
            if key not in ds:
                setattr(ds, key, "")
    expected = LPS_TO_RAS @ prediction.affine  # (column, row, slice) index -> LPS mm, as rt-utils maps its points
    placed = image_helper.get_pixel_to_patient_transformation_matrix(sources).astype(np.float64)
    if not np.allclose(placed, expected, atol=GEOMETRY_TOL_MM, rtol=1e-5):
        raise Seg3dError(
            "the RTSTRUCT writer (rt-utils) would place the contours off the series' voxel grid (largest difference "
            f"{np.abs(placed - expected).max():.3g} mm); --dicom-rtstruct refused for this series; --dicom-seg works"
        )
    with warnings.catch_warnings():  # rt-utils sets the transfer syntax the way pydicom 3 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        rt = RTStruct(sources, ds_helper.create_rtstruct_dataset(sources))
    for index, name in enumerate(pre.label_names[1:], start=1):
        mask = np.ascontiguousarray((labels == index).transpose(1, 0, 2))  # (x, y, z) -> (rows, columns, slices)
        if mask.any():
            rt.add_roi(mask=mask, name=name, roi_generation_algorithm="AUTOMATIC", use_pin_hole=False)
        else:  # rt-utils prints a line for an empty mask; an empty ROI is written directly, without contours
            _add_empty_roi(rt, name)
    _complete(rt.ds, sources[0], pre=pre, model_name=model_name, version=__version__)
    _snap_to_voxel_centres(rt.ds, expected)
    atomic_write(out, lambda tmp: rt.ds.save_as(tmp, enforce_file_format=True), suffix=".dcm")
    return out


def _snap_to_voxel_centres(ds, to_patient: np.ndarray) -> None:
    """rt-utils maps its points in float32, so a centre at -9.6 mm comes out as -9.599999904632568: off by 1e-7 mm
    and longer than the 16 characters of a DICOM decimal string. Its points are voxel centres by construction: each
    is mapped back to its voxel index, rounded, and mapped again in float64, then written to 0.1 micrometre."""
    to_index = np.linalg.inv(to_patient)
    for roi in ds.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            xyz = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)  # (N, 3) LPS mm
            ijk = np.round(np.c_[xyz, np.ones(len(xyz))] @ to_index.T)  # (N, 4) voxel indices
            snapped = (ijk @ to_patient.T)[:, :3]
            contour.ContourData = [round(float(v), 4) + 0.0 for v in snapped.ravel()]  # + 0.0: no "-0.0"


def _add_empty_roi(rt, name: str) -> None:
    from pydicom.dataset import Dataset

    number = len(rt.ds.StructureSetROISequence) + 1
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, rt.frame_of_reference_uid, name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    rt.ds.StructureSetROISequence.append(roi)
    contour = Dataset()  # no Contour Sequence (Type 3): an empty one is a sequence dciodvfy flags
    contour.ReferencedROINumber, contour.ROIDisplayColor = number, [128, 128, 128]
    rt.ds.ROIContourSequence.append(contour)
    observation = Dataset()
    observation.ObservationNumber, observation.ReferencedROINumber = number, number
    rt.ds.RTROIObservationsSequence.append(observation)


def _complete(ds, first, *, pre: Preprocessing, model_name: str, version: str) -> None:
    """What dciodvfy asks for and rt-utils does not write, and seg3d's name where rt-utils writes its own."""
    for key in _FROM_SERIES:
        setattr(ds, key, first.get(key, "") or "")
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "seg3d", model_name[:64], version
    if "InstitutionName" in ds:
        del ds.InstitutionName
    ds.SeriesDescription = f"seg3d {model_name}"[:64]
    ds.StructureSetLabel = "seg3d"
    ds.SeriesNumber = 9902
    ds.InstanceNumber = 1
    for roi in ds.StructureSetROISequence:
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROINumber = int(roi.ROINumber)
    for contour in ds.ROIContourSequence:
        contour.ReferencedROINumber = int(contour.ReferencedROINumber)
        for item in contour.get("ContourSequence", []):
            item.NumberOfContourPoints = len(item.ContourData) // 3
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    for observation in ds.RTROIObservationsSequence:
        category, _ = segment_codes(names[int(observation.ReferencedROINumber)])
        # "ORGAN" for anatomy; a lesion found by a model is no target volume a physician has drawn: left empty.
        observation.RTROIInterpretedType = "ORGAN" if category == ANATOMICAL_STRUCTURE else ""
        observation.ROIInterpreter = ""
        if "ROIObservationDescription" in observation:
            del observation.ROIObservationDescription  # rt-utils' display settings for its own viewer


def read_rtstruct(path: Path, sources: list) -> dict[str, np.ndarray]:
    """{ROI name: boolean mask (x, y, z) on the grid of `sources`}: each slice's contours filled again as rt-utils
    fills them (OpenCV's fillPoly of the points mapped to pixel positions), on a Rows x Columns slice (rt-utils'
    own reader makes its slices Columns x Rows, which holds for square images only)."""
    import cv2
    import pydicom
    from rt_utils import image_helper

    ds = pydicom.dcmread(path)
    to_pixel = np.linalg.inv(image_helper.get_pixel_to_patient_transformation_matrix(sources).astype(np.float64))
    slice_of = {str(s.SOPInstanceUID): z for z, s in enumerate(sources)}
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    contours = {int(c.ReferencedROINumber): c.get("ContourSequence", []) for c in ds.ROIContourSequence}
    masks = {}
    for roi in ds.StructureSetROISequence:
        mask = np.zeros((columns, rows, len(sources)), dtype=bool)  # (x, y, z)
        polygons: dict[int, list[np.ndarray]] = {}
        for contour in contours.get(int(roi.ROINumber), []):
            z = slice_of[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            xyz = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)  # (N, 3) LPS mm
            pixels = (np.c_[xyz, np.ones(len(xyz))] @ to_pixel.T)[:, :2]  # (N, 2): column, row
            polygons.setdefault(z, []).append(np.round(pixels).astype(np.int32))
        for z, shapes in polygons.items():
            plane = np.zeros((rows, columns), dtype=np.uint8)
            cv2.fillPoly(plane, shapes, color=1)
            mask[:, :, z] = plane.T.astype(bool)
        masks[str(roi.ROIName)] = mask
    return masks
