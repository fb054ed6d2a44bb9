"""`seg3d infer` on real files: output geometry, batch behaviour, bad input, MLflow model URIs, TTA, extras."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.bundle import load_bundle
from pipeline.cli import main
from pipeline.errors import Seg3dError
from pipeline.imageio import read_volume
from pipeline.infer import collect_inputs, parse_shard, run_inference
from pipeline.predict import FLIPS, Predictor
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti

SPEC = CaseSpec(shape=(80, 80, 24), spacing=(0.9, 0.9, 2.5), orientation="RAS", tumour=True, decoys=2)


def _sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(_sha(p).encode() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cases")
    for i, code in enumerate(["RAS", "LPS", "LAS"]):
        image, _, affine = make_phantom(np.random.default_rng(i), SPEC)
        nib.save(to_nifti(image, affine, code), root / f"case_{code}.nii.gz")
    return root


def _assert_same_geometry(source: Path, out: Path) -> None:
    a, b = nib.load(source), nib.load(out)
    assert a.shape[:3] == b.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    for code in ("qform_code", "sform_code"):
        assert int(b.header[code]) == int(a.header[code]), code
    np.testing.assert_allclose(b.get_qform(), a.get_qform(), atol=1e-6)
    np.testing.assert_allclose(b.get_sform(), a.get_sform(), atol=1e-6)


def test_outputs_have_the_inputs_geometry_and_inputs_are_untouched(bundle_dir, cases, tmp_path):
    before = {p.name: _sha(p) for p in cases.iterdir()}
    summary = run_inference(bundle_dir, cases, tmp_path / "out", progress=False)
    assert sorted(summary.done) == ["case_LAS", "case_LPS", "case_RAS"] and not summary.failed
    for name in before:
        _assert_same_geometry(cases / name, tmp_path / "out" / name)
    assert {p.name: _sha(p) for p in cases.iterdir()} == before, "inference changed an input"
    assert not list((tmp_path / "out").glob(".*")), "temporary files left behind"
    t = summary.timings["case_RAS"]
    assert set(t) == {"load", "preprocess", "network", "stitch", "invert", "write"} and t["network"] > 0


def test_batch_skips_finished_cases_and_overwrite_redoes_them(bundle_dir, cases, tmp_path):
    out = tmp_path / "out"
    run_inference(bundle_dir, cases, out, progress=False)
    stamp = (out / "case_RAS.nii.gz").stat().st_mtime_ns
    again = run_inference(bundle_dir, cases, out, progress=False)
    assert again.done == [] and sorted(again.skipped) == ["case_LAS", "case_LPS", "case_RAS"]
    assert (out / "case_RAS.nii.gz").stat().st_mtime_ns == stamp
    (out / "case_LPS.nii.gz").unlink()  # e.g. killed before this case was written
    resumed = run_inference(bundle_dir, cases, out, progress=False)
    assert resumed.done == ["case_LPS"]
    forced = run_inference(bundle_dir, cases, out, overwrite=True, progress=False)
    assert len(forced.done) == 3 and (out / "case_RAS.nii.gz").stat().st_mtime_ns != stamp


def test_a_bad_case_is_reported_and_the_rest_go_on(bundle_dir, cases, tmp_path, capsys):
    batch = tmp_path / "batch"
    shutil.copytree(cases, batch)
    data = (batch / "case_LPS.nii.gz").read_bytes()
    (batch / "case_LPS.nii.gz").write_bytes(data[: len(data) // 2])  # truncated gzip
    code = main(["infer", "--model", str(bundle_dir), "--input", str(batch), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if "case_LPS" in line] and all("Traceback" not in line for line in err)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["case_LAS.nii.gz", "case_LAS_manifest.json", "case_RAS.nii.gz", "case_RAS_manifest.json"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "x.nii.gz").write_bytes(b"not a nifti at all"), "x: "),
        (lambda d: nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), d / "x.nii.gz"), "x: "),
        (
            lambda d: nib.save(nib.Nifti1Image(np.full((16, 16, 8), np.nan, np.float32), np.eye(4)), d / "x.nii.gz"),
            "NaN",
        ),
    ],
    ids=["not-nifti", "2d", "nan"],
)
def test_a_bad_single_input_is_one_line_exit_2_and_no_output(bundle_dir, tmp_path, capsys, make, message):
    make(tmp_path)
    out = tmp_path / "pred.nii.gz"
    code = main(["infer", "--model", str(bundle_dir), "--input", str(tmp_path / "x.nii.gz"), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("seg3d infer: error:") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".pred*"))


def test_output_onto_the_input_is_refused(bundle_dir, cases):
    with pytest.raises(Seg3dError, match="would overwrite or be written into an input"):
        run_inference(bundle_dir, cases / "case_RAS.nii.gz", cases / "case_RAS.nii.gz", progress=False)


def test_shards_partition_the_batch(bundle_dir, cases, tmp_path, monkeypatch):
    names = [c.case for c in collect_inputs(cases)]
    parts = [run_inference(bundle_dir, cases, tmp_path / "o", shard=f"{i}/2", progress=False).done for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(names) and not set(parts[0]) & set(parts[1])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (1, 3)
    with pytest.raises(Seg3dError, match="must be i/n"):
        parse_shard("3/3")


def test_probabilities_gates_and_overlays(bundle_dir, cases, tmp_path):
    src = cases / "case_LAS.nii.gz"
    out = tmp_path / "pred.nii.gz"
    run_inference(bundle_dir, src, out, save_probabilities=True, overlays=True, postprocess=False, progress=False)
    saved = np.load(tmp_path / "pred_probabilities.npz")  # no pickle involved
    probs = saved["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (3, *nib.load(src).shape)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0)[probs.sum(0) > 0], 1.0, atol=1e-2)
    labels = np.asarray(nib.load(out).dataobj)
    agree = (probs.astype(np.float32).argmax(0) == labels).mean()
    assert agree > 0.999, "label map is the argmax of the saved probabilities"
    png = tmp_path / "overlays" / "pred.png"
    assert png.stat().st_size > 20_000

    bundle = load_bundle(bundle_dir)
    pred = Predictor.from_bundle(bundle).predict_file(src, gates=True)
    assert pred.gate.shape == labels.shape and 0.0 <= pred.gate.min() and pred.gate.max() <= 1.0


def test_tta_is_the_mean_of_the_eight_mirrored_predictions(bundle_dir):
    bundle = load_bundle(bundle_dir)
    plain = Predictor.from_bundle(bundle, precision="fp32")
    mirrored = Predictor.from_bundle(bundle, precision="fp32", tta=True)
    x = torch.randn(1, 1, 40, 36, 20)
    expected = torch.zeros(1, 3, 40, 36, 20)
    for dims in FLIPS:
        flipped = torch.flip(x, dims) if dims else x
        probs, _ = plain.predict_probabilities(flipped)
        expected += torch.flip(probs, dims) if dims else probs
    got, _ = mirrored.predict_probabilities(x)
    assert len(FLIPS) == 8 and len(set(FLIPS)) == 8
    torch.testing.assert_close(got, expected / 8, atol=1e-5, rtol=1e-5)


def test_models_uri_and_runs_uri_from_mlflow(bundle_dir, cases, tmp_path):
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "infer-test", tmp_path)
    run_id = tracker.start("r", tags={})
    tracker.log_artifacts(bundle_dir, "bundle")
    version = tracker.register_model("bundle", "seg3d-infer-test")
    tracker.end()
    src = cases / "case_RAS.nii.gz"
    for model in (f"models:/seg3d-infer-test/{version}", f"runs:/{run_id}/bundle"):
        out = tmp_path / f"{model.split(':')[0]}.nii.gz"
        code = main(["infer", "--model", model, "--tracking-uri", uri, "--input", str(src), "--output", str(out)])
        assert code == 0
        _assert_same_geometry(src, out)
    assert (
        main(
            [
                "infer",
                "--model",
                "models:/nope/1",
                "--tracking-uri",
                uri,
                "--input",
                str(src),
                "--output",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 2
    )


def test_real_ct_and_its_lps_copy_keep_their_geometry(bundle_dir, real_ct, tmp_path):
    ct = real_ct / "ct.nii.gz"
    lps = tmp_path / "ct_lps.nii.gz"
    img = nib.load(ct)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS"))
    nib.save(img.as_reoriented(ornt), lps)
    assert "".join(nib.aff2axcodes(nib.load(lps).affine)) == "LPS"
    for source in (ct, lps):
        out = tmp_path / f"pred_{source.name}"
        run_inference(bundle_dir, source, out, progress=False)
        _assert_same_geometry(source, out)


def _series_with_uids(real_ct: Path, folder: Path) -> Path:
    """The real series with the UIDs its anonymiser blanked put back (study, series, and the SOP UIDs its file
    meta header still holds): what a hospital PACS would send."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for path in sorted((real_ct / "dicom_series").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(folder / path.name)
    return folder


def test_dicom_series_gives_nifti_in_its_geometry_and_a_dicom_seg(bundle_dir, real_ct, tmp_path):
    import pydicom

    series = _series_with_uids(real_ct, tmp_path / "series")
    summary = run_inference(bundle_dir, series, tmp_path / "out", dicom_seg=True, progress=False)
    assert summary.done == ["series"]
    out = nib.load(tmp_path / "out" / "series.nii.gz")
    vol = read_volume(series)
    assert out.shape == vol.array.shape == (512, 512, 20)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)
    np.testing.assert_allclose(out.affine, read_volume(real_ct / "dicom_series").affine, atol=1e-4)
    # The LAS label map of the same series lies on the same grid once both are in one orientation.
    labels = nib.load(real_ct / "dicom_series_labels.nii.gz")
    np.testing.assert_allclose(nib.as_closest_canonical(out).affine, nib.as_closest_canonical(labels).affine, atol=1e-3)
    seg = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    source = pydicom.dcmread(sorted(series.iterdir())[0])
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["pancreas", "cancer"]
    assert int(seg.NumberOfFrames) == 2 * 20, "one frame per source slice and segment"
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}


def test_dicom_seg_of_a_series_without_uids_is_refused_before_any_output(bundle_dir, real_ct, tmp_path):
    """The shared series was anonymised down to blank study and series UIDs: no SEG can reference it."""
    summary = run_inference(bundle_dir, real_ct / "dicom_series", tmp_path / "out", dicom_seg=True, progress=False)
    assert summary.done == [] and "StudyInstanceUID" in summary.failed[0][1]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.gpu
def test_cuda_inference_matches_cpu_and_keeps_the_geometry(bundle_dir, cases, tmp_path):
    src = cases / "case_LPS.nii.gz"
    cpu = run_inference(bundle_dir, src, tmp_path / "cpu.nii.gz", device="cpu", precision="fp32", progress=False)
    gpu = run_inference(bundle_dir, src, tmp_path / "gpu.nii.gz", device="cuda", precision="fp32", progress=False)
    assert cpu.done == gpu.done == ["case_LPS"]
    _assert_same_geometry(src, tmp_path / "gpu.nii.gz")
    a, b = (np.asarray(nib.load(tmp_path / f"{d}.nii.gz").dataobj) for d in ("cpu", "gpu"))
    assert (a == b).mean() > 0.999


def test_a_datalist_is_an_input_too(bundle_dir, cases, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("case,image\n" + "".join(f"p{i},{p}\n" for i, p in enumerate(sorted(cases.glob("*.nii.gz")))))
    assert [c.case for c in collect_inputs(csv)] == ["p0", "p1", "p2"]
    summary = run_inference(bundle_dir, csv, tmp_path / "out", progress=False)
    assert summary.done == ["p0", "p1", "p2"]
    _assert_same_geometry(sorted(cases.glob("*.nii.gz"))[1], tmp_path / "out" / "p1.nii.gz")
