"""Property test of bundle loading (`pipeline.bundle.load_bundle`, what infer, evaluate and export read a model with):
random mutations of a valid bundle's preprocessing.json, config.yaml and metadata.json either load into a bundle
that a Predictor can be built from, or are refused with a one-line Seg3dError naming the file. Any other exception
is a traceback a user would see, and a bundle that loads with a number out of range would segment garbage.

The mutations work on the parsed records (a value replaced by one of another type, NaN, Inf, a huge, zero or negative
number, long text; a key removed; a key added; a number scaled; a list lengthened or cut; the whole record replaced)
and then on the text written (cut short, or odd bytes, an anchor or an alias inserted), on one to three files at once.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.bounds import MAX_PATCH_EDGE  # noqa: E402
from pipeline.bundle import CONFIG, METADATA, PREPROCESSING, WEIGHTS, load_bundle  # noqa: E402
from pipeline.errors import Seg3dError  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402

NAN, INF = float("nan"), float("inf")
NUMBERS = [None, True, False, 0, -1, 1, 2, 3, 4, 255, 256, 4096, 10**6, 10**30, 0.0, -0.0, 0.5, 1e-300, 1e300]
TEXTS = ["", "x", "nan", "background", "attention_unet", "window", "gate", "x" * 3000, "\n", "&a"]
LISTS = [[], {}, [1, 2, 3], [0.0, 0.0, 0.0], [2.0, 2.0], [-1, 2, 4], [32, 32, 16], [4096] * 3, {"a": 1}, [[1, 2]]]
ODD = st.sampled_from([*NUMBERS, NAN, INF, -INF, *TEXTS, *LISTS])
# (copies: a later "add" appends to the list it drew, which must not change ODD's own)
VALUES = st.one_of(ODD, st.integers(), st.floats(), st.text(max_size=12), st.lists(ODD, max_size=4)).map(copy.deepcopy)
SCALES = st.sampled_from([-1, 0, 1e6, 1e-6, NAN, INF, 1e30])
INSERTS = st.sampled_from(["\xff", "&a ", "*a", "{", "[", "]", "\x00", ": ", "\n  - ", ",", '"', "!!python/object "])
FILES = (PREPROCESSING, CONFIG, METADATA)


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path of a parsed record, e.g. ("unet_config", "channels", 0)."""
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out += _paths(child, (*prefix, key))
    return out


def _parent(doc, path):
    for key in path[:-1]:
        doc = doc[key]
    return doc


@st.composite
def mutated_record(draw, doc):
    """`doc` after up to three mutations of its values and keys (or, rarely, replaced as a whole). A nudge (a number
    made half as large again) often keeps the record valid, so the loading path is exercised as well."""
    doc = copy.deepcopy(doc)
    if draw(st.integers(0, 19)) == 0:
        return draw(VALUES)
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent, key = _parent(doc, path), path[-1]
        kind = draw(st.sampled_from(["set", "set", "nudge", "nudge", "delete", "add", "scale"]))
        value = parent[key]
        if kind == "set":
            parent[key] = draw(VALUES)
        elif kind == "delete":
            del parent[key]
        elif kind == "add" and isinstance(value, (dict, list)):
            if isinstance(value, dict):
                value[draw(st.text(max_size=8))] = draw(VALUES)
            else:
                value.append(draw(VALUES))
        elif kind in ("scale", "nudge") and isinstance(value, (int, float)) and not isinstance(value, bool):
            scaled = value * (1.5 if kind == "nudge" else draw(SCALES))
            parent[key] = int(scaled) if isinstance(value, int) and math.isfinite(scaled) else scaled
    return doc


@st.composite
def mutated_text(draw, text: str) -> bytes:
    """The record's text, maybe cut short or with odd characters (bytes that are not UTF-8, YAML anchors) inserted."""
    kind = draw(st.sampled_from(["as is", "as is", "cut", "insert"]))
    if kind == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif kind == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(INSERTS) + text[at:]
    return text.encode("utf-8", errors="surrogateescape").replace(b"\xc3\xbf", b"\xff")


def _dump(name: str, doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False) if name == CONFIG else json.dumps(doc, indent=2)


@pytest.fixture(scope="module")
def records(bundle_dir) -> dict[str, object]:
    return {
        PREPROCESSING: json.loads((bundle_dir / PREPROCESSING).read_text()),
        CONFIG: yaml.safe_load((bundle_dir / CONFIG).read_text()),
        METADATA: json.loads((bundle_dir / METADATA).read_text()),
    }


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same 100 bundles on every run and in CI
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_damaged_bundle_loads_usably_or_is_a_one_line_error_naming_the_file(data, bundle_dir, records):
    chosen = data.draw(st.sets(st.sampled_from(FILES), min_size=1, max_size=3), label="files")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bundle"
        shutil.copytree(bundle_dir, folder)
        for name in sorted(chosen):
            doc = data.draw(mutated_record(records[name]), label=name)
            try:
                text = _dump(name, doc)
            except (TypeError, ValueError, yaml.YAMLError):  # a key JSON cannot write: leave that record as it was
                continue
            (folder / name).write_bytes(data.draw(mutated_text(text), label=f"{name} text"))
        try:
            bundle = load_bundle(folder)
        except Seg3dError as err:
            message = str(err)
            assert "\n" not in message and len(message) < 600, message[:600]
            assert any(name in message for name in (*FILES, WEIGHTS)), message
            event(f"refused: {next(name for name in (*FILES, WEIGHTS) if name in message)}")
            return
    event("loaded")
    pre, cfg = bundle.preprocessing, bundle.config
    assert all(math.isfinite(s) and s > 0 for s in pre.target_spacing)
    assert math.isfinite(pre.mean) and math.isfinite(pre.std) and pre.std > 0 and pre.clip[0] < pre.clip[1]
    assert pre.label_values[0] == 0 and len(set(pre.label_values)) == len(pre.label_values) == pre.num_classes >= 2
    assert bundle.model.config.out_channels == pre.num_classes and bundle.model.config.in_channels == 1
    assert all(1 <= n <= MAX_PATCH_EDGE for n in cfg.data.patch_size)
    Predictor.from_bundle(bundle, postprocess=False)  # what infer builds next: it must not fail on a bundle that loaded
    try:
        Predictor.from_bundle(bundle)
    except Seg3dError as err:  # by design (--no-postprocess still runs): a rule naming a class the model lacks
        assert str(err).startswith("postprocess.inside names ") and "\n" not in str(err), str(err)
        event("post-processing rule refused by the Predictor")
