"""Datalists written byte by byte and structure by structure (hypothesis, fixed seed): MSD dataset.json documents of
any JSON shape and near-valid ones with hostile case ids, class names and paths, and CSVs of random cells. Each
either loads into cases whose ids are safe single file names, or is a one-line Seg3dError; never another
exception."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.datalists import list_images, load_dataset
from pipeline.errors import Seg3dError
from pipeline.names import MAX_CASE_ID

SETTINGS = settings(
    max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NASTY_TEXT = st.one_of(
    st.sampled_from(["../../x", "/etc/passwd", "a/b", "a\nb", ".hidden", "", " ", "=1+1", "x" * 300, "_0000", "ok_1"]),
    st.text(max_size=40),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | NASTY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NASTY_TEXT, inner, max_size=4),
    max_leaves=12,
)
PATH = NASTY_TEXT.map(lambda s: s + ".nii.gz") | NASTY_TEXT
ENTRY = st.one_of(
    st.fixed_dictionaries({"image": PATH, "label": PATH}),
    st.fixed_dictionaries({"image": JSON, "label": JSON}),
    JSON,
)
LABELS = st.one_of(
    st.just({"0": "background", "1": "pancreas", "2": "cancer"}),
    st.dictionaries(st.integers(-3, 300).map(str) | NASTY_TEXT, JSON | NASTY_TEXT, max_size=4),
    JSON,
)
DOCS = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"labels": LABELS, "training": st.lists(ENTRY, max_size=3) | JSON},
        optional={"test": st.lists(st.one_of(PATH, ENTRY), max_size=3) | JSON},
    ),
)


def _check(load, path: Path) -> None:
    try:
        cases = load(path)
    except Seg3dError as err:
        assert "\n" not in str(err) and len(str(err)) < 2000, str(err)[:300]
        return
    for case in getattr(cases, "cases", cases) + getattr(cases, "test", []):
        assert 0 < len(case.case) <= MAX_CASE_ID and "/" not in case.case and "\n" not in case.case
        assert not case.case.startswith((".", "-")), case.case


@SETTINGS
@given(doc=DOCS)
def test_any_dataset_json_loads_with_safe_ids_or_is_a_seg3d_error(doc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("msd")
    path = folder / "dataset.json"
    path.write_text(json.dumps(doc))
    _check(load_dataset, path)
    _check(list_images, path)


@SETTINGS
@given(
    header=st.sampled_from([["case", "image", "label"], ["case", "image"], ["image", "case", "label", "x"], ["a"]]),
    rows=st.lists(st.lists(NASTY_TEXT, min_size=0, max_size=4), max_size=4),
)
def test_any_csv_datalist_loads_with_safe_ids_or_is_a_seg3d_error(header, rows, tmp_path_factory):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("csv") / "list.csv"
    path.write_text(buffer.getvalue())
    _check(load_dataset, path)
    _check(list_images, path)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_datalist_are_a_seg3d_error_or_a_datalist(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bytes")
    for name in ("dataset.json", "list.csv"):
        (folder / name).write_bytes(data)
        _check(load_dataset, folder / name)
