"""`seg3d serve` against a real PACS: Orthanc (Debian's package) on loopback pushes CT series to the node, which
sends DICOM SEG back; the SEG is read back through Orthanc's REST API and compared, frame for frame, with what
`seg3d infer --dicom-seg` writes for the same series. The faults are real: the node is SIGKILLed at its fault
points (pipeline/faults.py) and started again on the same spool; Orthanc is stopped while the node sends."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from pipeline.infer import run_inference
from pipeline.serve.spool import case_key
from tests.pipeline._ct_series import phantom_hu, write_ct_series
from tests.pipeline._orthanc import Orthanc, free_port, orthanc_binary
from tests.pipeline._serve_node import ServeNode, scu_store
from tests.pipeline.test_infer import _series_with_uids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    orthanc_binary()  # skips, with the reason, where Orthanc is not installed
    with Orthanc(tmp_path_factory.mktemp("pacs")) as orthanc:
        yield orthanc


def _node(pacs: Orthanc, bundle: Path, spool: Path, name: str, **kwargs) -> ServeNode:
    """A node on a free port, known to the PACS as modality `name` (so that `pacs.push(..., name)` reaches it)."""
    node = ServeNode(bundle, spool, port=free_port(), send_to=f"ORTHANC@127.0.0.1:{pacs.dicom_port}", **kwargs)
    pacs.request("PUT", f"/modalities/{name}", json={"AET": "SEG3D", "Host": "127.0.0.1", "Port": node.port})
    return node


@pytest.fixture(scope="module")
def node(pacs, bundle_dir, tmp_path_factory):
    """One node for the tests that do not kill it, with /health and /metrics on, sending an RTSTRUCT too."""
    health = free_port()
    spool = tmp_path_factory.mktemp("node") / "spool"
    node = _node(pacs, bundle_dir, spool, "seg3d", extra=("--health-port", str(health), "--rtstruct"))
    node.health = health
    node.start()
    yield node
    node.stop()


def _phantom(folder: Path, seed: int, *, slices: int = 12) -> str:
    """A small CT series (one file per slice, real UIDs); its Series Instance UID."""
    return write_ct_series(folder, phantom_hu(shape=(48, 44, slices), seed=seed))["series"]


def _segs_for(pacs: Orthanc, series_uid: str) -> list[str]:
    """The SOP Instance UIDs of the SEG instances in the PACS that reference `series_uid`."""
    found = []
    for series in pacs.series("SEG"):
        for instance in series["Instances"]:
            tags = pacs.tags(instance)
            referenced = tags.get("ReferencedSeriesSequence") or [{}]
            if referenced[0].get("SeriesInstanceUID") == series_uid:
                found.append(tags["SOPInstanceUID"])
    return found


def _seg_file(pacs: Orthanc, sop_uid: str) -> pydicom.Dataset:
    (match,) = pacs.request("POST", "/tools/lookup", data=sop_uid)
    return pydicom.dcmread(io.BytesIO(pacs.instance_file(match["ID"])))


def _frames(seg: pydicom.Dataset) -> dict[tuple[int, str], np.ndarray]:
    """Each frame of a SEG keyed by (segment number, the CT slice it lies on)."""
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    keyed = {}
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        keyed[(segment, str(source))] = frame
    return keyed


def _assert_same_as_infer(pacs: Orthanc, sop_uid: str, series: Path, bundle: Path, out: Path) -> None:
    """The SEG the node sent equals, frame for frame, the one `seg3d infer --dicom-seg` writes for the series."""
    run_inference(bundle, series, out, dicom_seg=True, device="cpu", progress=False)
    (local,) = out.glob("*_seg.dcm")
    sent, wanted = _frames(_seg_file(pacs, sop_uid)), _frames(pydicom.dcmread(local))
    assert sent.keys() == wanted.keys()
    for key, frame in wanted.items():
        np.testing.assert_array_equal(sent[key], frame, err_msg=str(key))


def _wait_segs(pacs: Orthanc, series_uid: str, count: int = 1, timeout: float = 180) -> list[str]:
    return pacs.wait_for(lambda: len(_segs_for(pacs, series_uid)) >= count and _segs_for(pacs, series_uid), timeout,
                         f"{count} SEG referencing series {case_key(series_uid)}")  # fmt: skip


# -- the round trip ---------------------------------------------------------------------------------------------------


def test_a_phantom_and_the_real_series_pushed_in_one_association_come_back_as_seg_equal_to_infer(
    pacs, node, bundle_dir, real_ct, tmp_path
):
    phantom = tmp_path / "phantom"
    phantom_uid = _phantom(phantom, seed=1)
    real = _series_with_uids(real_ct, tmp_path / "real")
    real_uid = str(pydicom.dcmread(next(real.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    ids = [pacs.upload(phantom), pacs.upload(real)]
    pacs.push_many(ids, "seg3d")  # both series in one association
    for uid, folder in ((phantom_uid, phantom), (real_uid, real)):
        (sop,) = _wait_segs(pacs, uid)
        _assert_same_as_infer(pacs, sop, folder, bundle_dir, tmp_path / f"infer-{folder.name}")
        # Queried back through the PACS: the SEG sits in the source's study, on its frame of reference.
        seg, source = _seg_file(pacs, sop), pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert f"series {case_key(uid)}: sent 2 object(s)" in node.log()  # the SEG and the RTSTRUCT
        study = pacs.series_of(uid)["ParentStudy"]
        assert len([s for s in pacs.series("RTSTRUCT") if s["ParentStudy"] == study]) == 1
    # The log names series by their key only: no patient name or id of the series it handled.
    for name in ("DOE^JANE", "PID-987654321", str(pydicom.dcmread(next(real.iterdir())).PatientName or "@@")):
        assert name not in node.log()


def test_two_series_in_two_concurrent_associations_each_get_their_own_seg(pacs, node, bundle_dir, tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    uids = [_phantom(folder, seed=10 + i, slices=10 + 2 * i) for i, folder in enumerate(folders)]
    ids = [pacs.upload(folder) for folder in folders]
    errors = []

    def push(series_id):
        try:
            pacs.push(series_id, "seg3d")
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=push, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for uid, folder in zip(uids, folders):
        (sop,) = _wait_segs(pacs, uid)
        _assert_same_as_infer(pacs, sop, folder, bundle_dir, tmp_path / f"infer-{folder.name}")


def test_refused_callers_non_ct_and_corrupt_series_are_logged_by_key_and_the_node_keeps_serving(pacs, node, tmp_path):
    good = tmp_path / "good"
    _phantom(good, seed=20)
    files = sorted(good.iterdir())
    # A calling AE title not in --allow: the association is refused and logged.
    assert scu_store(files[:1], node.port, calling="INTRUDER") == [None]
    node.wait_log("refused an association from 'INTRUDER'")

    # An MR series: every instance refused, named by its key, nothing stored for it.
    mr = tmp_path / "mr"
    mr_uid = _phantom(mr, seed=21, slices=4)
    for path in mr.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.Modality = "MR"
        ds.save_as(path)
    assert scu_store(sorted(mr.iterdir()), node.port) == [0xA900] * 4
    node.wait_log(f"series {case_key(mr_uid)} from ORTHANC: an instance was refused: it is MR Image Storage")

    # A CT series with one truncated slice: that instance refused, the series failed as incomplete, nothing sent.
    corrupt = tmp_path / "corrupt"
    corrupt_uid = _phantom(corrupt, seed=22, slices=6)
    victim = sorted(corrupt.iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(victim)
    statuses = scu_store(sorted(corrupt.iterdir()), node.port)
    assert statuses == [0, 0, 0, 0xA900, 0, 0]
    key = case_key(corrupt_uid)
    node.wait_log(f"series {key} (")
    assert "failed, nothing sent: incomplete series: an instance was refused: pixel data of 100 bytes" in node.log()
    assert any(p.name.startswith(key) for p in (node.spool / "failed").iterdir())

    # A series with a slice missing in the middle: every instance stored, the series fails to read as a volume.
    gap = tmp_path / "gap"
    gap_uid = write_ct_series(gap, phantom_hu(shape=(48, 44, 8), seed=23), gap_after=3)["series"]
    assert scu_store(sorted(gap.iterdir()), node.port) == [0] * 8
    node.wait_log(f"series {case_key(gap_uid)} (")
    assert "uneven slice gaps" in node.log()

    # Still serving: a good series pushed after all that comes back.
    good_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    pacs.push(pacs.upload(good), "seg3d")
    _wait_segs(pacs, good_uid)
    assert not _segs_for(pacs, mr_uid) and not _segs_for(pacs, corrupt_uid) and not _segs_for(pacs, gap_uid)


def test_a_burst_of_ten_series_is_all_sent_and_health_and_metrics_tell(pacs, node, tmp_path):
    uids, ids = [], []
    for i in range(10):
        uids.append(_phantom(tmp_path / f"s{i}", seed=100 + i, slices=8))
        ids.append(pacs.upload(tmp_path / f"s{i}"))
    for series_id in ids:  # back to back, one association each, as a modality sends a worklist
        pacs.push(series_id, "seg3d")
    for uid in uids:
        assert len(_wait_segs(pacs, uid)) == 1
    health = requests.get(f"http://127.0.0.1:{node.health}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["queued"] == 0
    metrics = requests.get(f"http://127.0.0.1:{node.health}/metrics", timeout=5).text
    done = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("seg3d_series_done_total"))
    assert done >= 10
    assert "seg3d_queue_length 0.0" in metrics


# -- faults: every acknowledged series ends with exactly one SEG in the PACS ----------------------------------------


def test_a_full_spool_refuses_instances_with_out_of_resources_and_serves_again_once_space_is_free(
    pacs, bundle_dir, tmp_path
):
    spool = tmp_path / "small"
    spool.mkdir()
    # 64 MiB: what inference needs free besides (seg3d infer asks for 16 MiB of margin), filled up below.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(spool)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs for the spool here (needs root); the full-disk case is not run")
    node = _node(pacs, bundle_dir, spool / "spool", "full-disk")
    node.log_path = tmp_path / "node.log"
    try:
        node.start()
        filler = spool / "filler"
        with open(filler, "wb") as f:  # whatever else fills the disk, to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        series = tmp_path / "series"
        uid = _phantom(series, seed=40, slices=6)
        assert set(scu_store(sorted(series.iterdir()), node.port)) == {0xA700}  # out of resources: nothing taken
        node.wait_log(f"series {case_key(uid)}: cannot store an instance (No space left on device)")
        filler.unlink()  # space again: the same node takes the series and sends its SEG
        pacs.push(pacs.upload(series), "full-disk")
        _wait_segs(pacs, uid)
    finally:
        node.stop()
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def test_bad_arguments_are_one_line_and_exit_2(bundle_dir, tmp_path, capsys):
    from pipeline.cli import main

    base = ["serve", "--model", str(bundle_dir), "--spool", str(tmp_path / "spool"), "--health-port", "0"]
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [
        (["--send-to", "ORTHANC@pacs"], "--send-to 'ORTHANC@pacs' is not AET@HOST:PORT"),
        (["--send-to", "A@h:1", "--ae-title", "MUCH-TOO-LONG-AE-TITLE"], "--ae-title 'MUCH-TOO-LONG-AE-TITLE' is not"),
        (["--send-to", "A@h:1", "--allow", "BAD\\AE"], "is not an AE title"),
        (["--send-to", "A@h:1", "--quiet-time", "0"], "--quiet-time 0.0 must be in (0, 3600]"),
        (["--send-to", "A@h:1", "--port", "70000"], "--port 70000 is not a TCP port"),
        (["--send-to", "A@h:1", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1])], "cannot listen on"),
    ]
    try:
        for extra, message in cases:
            assert main([*base, *extra]) == 2, extra
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("seg3d serve: error: ") and message in err[-1], (extra, err)
            assert "Traceback" not in "\n".join(err)
    finally:
        taken.close()
    (tmp_path / "file").write_text("not a folder")
    in_a_file = str(tmp_path / "file" / "spool")
    assert main(["serve", "--model", str(bundle_dir), "--spool", in_a_file, "--send-to", "A@h:1"]) == 2
    assert "seg3d serve: error: --spool" in capsys.readouterr().err
    assert (
        main(["serve", "--model", str(tmp_path / "nope"), "--spool", str(tmp_path / "s2"), "--send-to", "A@h:1"]) == 2
    )
    assert f"model {tmp_path / 'nope'} not found" in capsys.readouterr().err


def _fault_case(pacs, bundle_dir, tmp_path, name: str, fault: str, seed: int, env=None):
    series = tmp_path / "series"
    uid = _phantom(series, seed=seed)
    node = _node(pacs, bundle_dir, tmp_path / "spool", name)
    node.start(fault=fault, env=env)
    return node, uid, pacs.upload(series)


def test_killed_while_receiving_sends_nothing_for_the_broken_series_and_one_seg_once_it_is_sent_again(
    pacs, bundle_dir, tmp_path
):
    node, uid, series_id = _fault_case(pacs, bundle_dir, tmp_path, "kill-receive", "serve.received:5", seed=30)
    with pytest.raises(RuntimeError):  # the node dies in the middle of the association
        pacs.push(series_id, "kill-receive")
    assert node.wait_exit() == -9
    # On disk: the four acknowledged, and the fifth, written but killed before its answer.
    assert len(list((node.spool / "incoming").glob("*/*.dcm"))) == 5
    node.start()
    # Nothing more comes: the 4 slices are an incomplete series, failed with a line, nothing sent.
    node.wait_log(f"series {case_key(uid)} (", timeout=60)
    assert "the association that brought it broke off" in node.log()
    assert not _segs_for(pacs, uid)
    # The PACS sends it again: one SEG.
    pacs.push(series_id, "kill-receive")
    _wait_segs(pacs, uid)
    time.sleep(3)
    assert len(_segs_for(pacs, uid)) == 1
    node.stop()


def test_killed_while_inferring_finishes_the_series_after_a_restart(pacs, bundle_dir, tmp_path):
    node, uid, series_id = _fault_case(pacs, bundle_dir, tmp_path, "kill-infer", "infer.case:1", seed=31)
    pacs.push(series_id, "kill-infer")  # acknowledged in full, then the node dies inside the inference
    assert node.wait_exit() == -9
    assert not _segs_for(pacs, uid)
    node.start()
    _wait_segs(pacs, uid)
    node.wait_log(f"series {case_key(uid)}: sent 1 object(s)")
    time.sleep(3)
    assert len(_segs_for(pacs, uid)) == 1
    node.stop()


def test_killed_after_the_pacs_acknowledged_the_seg_leaves_one_seg(pacs, bundle_dir, tmp_path):
    node, uid, series_id = _fault_case(pacs, bundle_dir, tmp_path, "kill-send", "serve.sent:1", seed=32)
    pacs.push(series_id, "kill-send")
    assert node.wait_exit() == -9  # stored in the PACS, not yet marked sent in the spool
    (first,) = _wait_segs(pacs, uid)
    node.start()  # sends the same object again (it cannot know): the PACS keeps one instance, the same UID
    node.wait_log(f"series {case_key(uid)}: sent 1 object(s)")
    assert _segs_for(pacs, uid) == [first]
    assert len(list((node.spool / "sent").iterdir())) == 1 and not any((node.spool / "outbox").iterdir())
    node.stop()


def test_the_pacs_down_while_the_node_sends_gets_the_seg_once_it_is_back(pacs, bundle_dir, tmp_path):
    faults = tmp_path / "faults"
    faults.mkdir()
    env = {"SEG3D_FAULT_DIR": str(faults)}
    node, uid, series_id = _fault_case(pacs, bundle_dir, tmp_path, "pacs-down", "serve.segmented:1:wait", 33, env)
    pacs.push(series_id, "pacs-down")
    pacs.wait_for(lambda: (faults / "serve.segmented.1.reached").exists(), 120, "the node to segment the series")
    pacs.stop()
    (faults / "serve.segmented.1.go").touch()
    node.wait_log(f"series {case_key(uid)}: not sent yet", count=2)
    pacs.start()
    _wait_segs(pacs, uid)
    node.wait_log(f"series {case_key(uid)}: sent 1 object(s)")
    time.sleep(3)
    assert len(_segs_for(pacs, uid)) == 1
    node.stop()
