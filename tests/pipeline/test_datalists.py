"""Datalists on real files: phantom datasets from `seg3d synth` in MSD, folder and CSV layouts, label selections,
and the seeded k-fold split."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.datalists import Case, Dataset, load_dataset, parse_labels
from pipeline.errors import Seg3dError
from pipeline.splits import kfold_split
from tests.pipeline._datasets import ct, organ, phantom_dataset, save


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_dataset(tmp_path_factory.mktemp("phantom"))


def test_msd_dataset_json_loads_cases_labels_and_test_labels(phantom):
    ds = load_dataset(phantom)
    assert [c.case for c in ds.cases] == ["pancreas_001", "pancreas_002", "pancreas_003"]
    assert ds.cases[1] == Case(
        "pancreas_002",
        phantom / "imagesTr" / "pancreas_002.nii.gz",
        phantom / "labelsTr" / "pancreas_002.nii.gz",
        decoy=phantom / "decoysTr" / "pancreas_002.nii.gz",
    )
    assert ds.test == [
        Case(
            "pancreas_004",
            phantom / "imagesTs" / "pancreas_004.nii.gz",
            phantom / "labelsTs" / "pancreas_004.nii.gz",
            decoy=phantom / "decoysTs" / "pancreas_004.nii.gz",
        )
    ]
    assert ds.labels == {"background": 0, "pancreas": 1, "cancer": 2} and ds.exhaustive
    assert ds.class_names == ["background", "pancreas", "cancer"]
    assert all(c.image.is_file() and c.label.is_file() for c in ds.cases + ds.test)
    assert load_dataset(phantom / "dataset.json").fingerprint() == ds.fingerprint()


def test_msd_test_case_without_labels_ts_has_no_label(tmp_path, phantom):
    doc = json.loads((phantom / "dataset.json").read_text())
    # absolute paths; decoy masks must lie inside the dataset folder, so they are left out
    doc["training"] = [{k: str(phantom / v) for k, v in e.items() if k != "decoy"} for e in doc["training"]]
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    (tmp_path / "imagesTs").mkdir()
    ds = load_dataset(tmp_path / "dataset.json")
    assert ds.cases == [replace(c, decoy=None) for c in load_dataset(phantom).cases]
    assert ds.test == [Case("pancreas_004", tmp_path / "imagesTs" / "pancreas_004.nii.gz", None)]


def test_folder_and_csv_layouts_give_the_same_cases_as_msd(tmp_path, phantom):
    msd = load_dataset(phantom)
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rows = ["case,image,label"]
    for c in msd.cases:
        (folder / "images" / f"{c.case}_0000.nii.gz").symlink_to(c.image)  # nnU-Net channel suffix
        (folder / "labels" / f"{c.case}.nii.gz").symlink_to(c.label)
        rows.append(f"{c.case},{os.path.relpath(c.image, tmp_path)},{os.path.relpath(c.label, tmp_path)}")
    (folder / "images" / "._pancreas_001.nii.gz").write_bytes(b"\0")  # macOS litter, as in the MSD tarballs
    rows.append(f"pancreas_004,{os.path.relpath(msd.test[0].image, tmp_path)},")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")

    by_folder, by_csv = load_dataset(folder), load_dataset(tmp_path / "list.csv")
    for ds in (by_folder, by_csv):
        assert [c.case for c in ds.cases] == [c.case for c in msd.cases]
        assert [c.image.resolve() for c in ds.cases] == [c.image.resolve() for c in msd.cases]
        assert [c.label.resolve() for c in ds.cases] == [c.label.resolve() for c in msd.cases]
        assert ds.labels == msd.labels and ds.exhaustive
    assert by_folder.test == []
    assert [(c.case, c.image.resolve(), c.label) for c in by_csv.test] == [("pancreas_004", msd.test[0].image, None)]
    assert by_csv.cases[0].image == tmp_path / os.path.relpath(msd.cases[0].image, tmp_path)  # relative to the CSV


def test_unmatched_image_and_label_ids_are_named(tmp_path):
    for name in ("case_a", "case_b"):
        save(tmp_path / "images" / f"{name}_0000.nii.gz", ct())
    for name in ("case_a", "case_c"):
        save(tmp_path / "labels" / f"{name}.nii.gz", organ())
    with pytest.raises(Seg3dError) as err:
        load_dataset(tmp_path)
    assert "images without a label in labels/: case_b" in str(err.value)
    assert "labels without an image in images/: case_c" in str(err.value)


def test_bad_dataset_paths_say_what_dataset_may_be(tmp_path):
    with pytest.raises(Seg3dError, match=r"dataset not found: .*DATASET may be an MSD dataset\.json"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Seg3dError, match="is not a dataset; DATASET may be"):
        load_dataset(tmp_path / "notes.txt")
    (tmp_path / "bad.csv").write_text("id,file\n1,x.nii.gz\n")
    with pytest.raises(Seg3dError, match="header 'id,file'; it must be case,image,label"):
        load_dataset(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("case,image,label\n")
    with pytest.raises(Seg3dError, match="no labelled cases"):
        load_dataset(tmp_path / "empty.csv")


def test_parse_labels():
    assert parse_labels("pancreas=7") == {"background": 0, "pancreas": 7}
    assert list(parse_labels(" pancreas = 7 , liver=5")) == ["background", "pancreas", "liver"]
    for bad, why in [
        ("pancreas", "NAME=VALUE"),
        ("pancreas=x", "NAME=VALUE"),
        ("=7", "NAME=VALUE"),
        ("pancreas=-1", "NAME=VALUE"),
        ("pancreas=0", "0 is background"),
        ("a=1,a=2", "named twice"),
        ("a=1,b=1", "given to two classes"),
        ("a=300", "above 255"),
        ("", "NAME=VALUE"),
    ]:
        with pytest.raises(Seg3dError, match=why):
            parse_labels(bad)


def test_remap_exhaustive_and_selection(tmp_path):
    values = np.array([[0, 1, 2], [5, 7, 117]], dtype=np.uint8)
    msd = Dataset([], [], {"background": 0, "pancreas": 1, "cancer": 2}, True, tmp_path)
    np.testing.assert_array_equal(msd.remap(np.array([0, 2, 1, 0])), [0, 2, 1, 0])
    with pytest.raises(Seg3dError, match=r"label values 5, 7, 117 are not declared .*--labels NAME=VALUE"):
        msd.remap(values, case="c1")
    selection = Dataset([], [], parse_labels("pancreas=7,liver=5"), False, tmp_path)
    out = selection.remap(values)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 0, 0], [2, 1, 0]])
    np.testing.assert_array_equal(selection.remap(values.astype(np.float64)), out)  # float masks, as on disk


def test_labels_option_makes_a_selection_and_changes_the_fingerprint(phantom):
    declared, selected = load_dataset(phantom), load_dataset(phantom, labels={"pancreas": 1})
    assert selected.labels == {"background": 0, "pancreas": 1} and not selected.exhaustive
    assert declared.fingerprint() != selected.fingerprint()
    assert len(declared.fingerprint()) == 16


# ---------------------------------------------------------------------------------------------------------
# check-data


def test_kfold_split_is_a_seeded_partition():
    ids = [f"c{i}" for i in range(11)]
    folds = [kfold_split(ids, 5, k, seed=3) for k in range(5)]
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids), "each case validates once"
    for f in folds:
        assert set(f["train"]).isdisjoint(f["val"]) and set(f["train"]) | set(f["val"]) == set(ids)
    assert kfold_split(ids, 5, 2, seed=3) == folds[2]
    assert kfold_split(ids, 5, 2, seed=4)["val"] != folds[2]["val"]
    with pytest.raises(Seg3dError, match="cannot make 5 folds"):
        kfold_split(ids[:3], 5, 0, seed=0)
