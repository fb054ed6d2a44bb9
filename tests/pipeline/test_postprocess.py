"""Post-processing: the largest foreground structure and the configured "class inside class" rules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from pipeline.bundle import load_bundle
from pipeline.config import PostprocessConfig, config_from_dict, load_config
from pipeline.errors import Seg3dError
from pipeline.postprocess import inside_rules, postprocess


def test_postprocess_keeps_the_organ_and_the_tumour_inside_it():
    from pipeline.config import PostprocessConfig
    from pipeline.postprocess import postprocess

    names = ["background", "pancreas", "cancer"]
    labels = np.zeros((60, 60, 40), np.uint8)
    labels[10:30, 10:30, 5:20] = 1
    labels[15:20, 15:20, 8:12] = 2  # tumour inside the gland: kept
    labels[40:45, 40:45, 30:35] = 1  # a smaller pancreas-like blob elsewhere: removed
    labels[50:53, 5:8, 2:4] = 2  # a tumour far from any pancreas: removed
    out = postprocess(labels, names, PostprocessConfig())
    expected = labels.copy()
    expected[40:45, 40:45, 30:35] = 0
    expected[50:53, 5:8, 2:4] = 0
    np.testing.assert_array_equal(out, expected)
    off = PostprocessConfig(largest_component=False, tumour_inside_pancreas=False)
    np.testing.assert_array_equal(postprocess(labels, names, off), labels)
    only_tumour_rule = postprocess(labels, names, PostprocessConfig(largest_component=False))
    assert (only_tumour_rule[40:45, 40:45, 30:35] == 1).all() and not only_tumour_rule[50:53, 5:8, 2:4].any()


def _organ_tumour_decoys() -> np.ndarray:
    """The labels of the test above: a gland (1) with a tumour (2) inside, a smaller gland elsewhere, a far tumour."""
    labels = np.zeros((60, 60, 40), np.uint8)
    labels[10:30, 10:30, 5:20] = 1
    labels[15:20, 15:20, 8:12] = 2
    labels[40:45, 40:45, 30:35] = 1
    labels[50:53, 5:8, 2:4] = 2
    return labels


def test_the_inside_rule_follows_the_config_not_the_class_names():
    labels = _organ_tumour_decoys()
    far_tumour = (slice(50, 53), slice(5, 8), slice(2, 4))
    other_names = ["background", "organ", "lesion"]
    # Without a rule for these names nothing ties the lesion to the organ; with one, it is the pancreas rule.
    plain = postprocess(labels, other_names, PostprocessConfig(largest_component=False))
    np.testing.assert_array_equal(plain, labels)
    ruled = postprocess(labels, other_names, PostprocessConfig(largest_component=False, inside={"lesion": "organ"}))
    pancreas = postprocess(labels, ["background", "pancreas", "cancer"], PostprocessConfig(largest_component=False))
    np.testing.assert_array_equal(ruled, pancreas)
    assert not ruled[far_tumour].any() and (ruled[15:20, 15:20, 8:12] == 2).all()
    # `inside: {}` turns the pancreas default off; the rule can point either way.
    names = ["background", "pancreas", "cancer"]
    kept = postprocess(labels, names, PostprocessConfig(largest_component=False, inside={}))
    np.testing.assert_array_equal(kept, labels)
    reverse = postprocess(labels, names, PostprocessConfig(largest_component=False, inside={"pancreas": "cancer"}))
    assert (reverse[10:30, 10:30, 5:20] > 0).all(), "the gland touches its tumour: kept"
    assert not reverse[40:45, 40:45, 30:35].any(), "the gland that touches no tumour: removed"


def test_the_default_rule_is_the_tumour_inside_the_pancreas_where_the_model_has_both():
    default = PostprocessConfig()
    assert inside_rules(default, ["background", "pancreas", "cancer"]) == [(2, 1)]
    assert inside_rules(default, ["background", "Tumor", "liver", "Pancreas"]) == [(1, 3)]  # old spellings, any case
    assert inside_rules(default, ["background", "pancreas"]) == []  # a pancreas-only model: no rule, no error
    assert inside_rules(PostprocessConfig(inside={}), ["background", "pancreas", "cancer"]) == []


@pytest.mark.parametrize(
    ("inside", "named"), [({"tumor": "pancreas"}, "'tumor'"), ({"cancer": "background"}, "'background'")]
)
def test_a_rule_naming_a_class_the_model_lacks_is_an_error_naming_the_valid_ones(inside, named):
    with pytest.raises(Seg3dError, match=rf"postprocess.inside names {named}.*classes are pancreas, cancer"):
        inside_rules(PostprocessConfig(inside=inside), ["background", "pancreas", "cancer"])


def test_a_class_inside_itself_is_a_config_error():
    with pytest.raises(Seg3dError, match=r"postprocess.*inside itself: cancer"):
        load_config(None, ["postprocess.inside={cancer: cancer}"])
    assert load_config(None, ["postprocess.inside={lesion: organ}"]).postprocess.inside == {"lesion": "organ"}


def test_the_old_key_is_translated_and_the_resolved_config_keeps_only_the_new_one():
    """Configs and bundles written before `inside` existed say `tumour_inside_pancreas: true|false`."""
    on = config_from_dict({"postprocess": {"largest_component": True, "tumour_inside_pancreas": True}})
    off = config_from_dict({"postprocess": {"largest_component": False, "tumour_inside_pancreas": False}})
    assert on.postprocess == PostprocessConfig() and on.postprocess.inside is None
    assert off.postprocess.inside == {} and not off.postprocess.largest_component
    assert load_config(None, ["postprocess.tumour_inside_pancreas=false"]).postprocess.inside == {}
    written = on.to_dict()["postprocess"]
    assert written == {"largest_component": True, "inside": None}
    assert config_from_dict(on.to_dict()) == on
    with pytest.raises(Seg3dError, match="either inside or tumour_inside_pancreas"):
        config_from_dict({"postprocess": {"tumour_inside_pancreas": True, "inside": {"cancer": "pancreas"}}})
    with pytest.raises(Seg3dError, match="tumour_inside_pancreas must be true or false"):
        config_from_dict({"postprocess": {"tumour_inside_pancreas": "maybe"}})


@pytest.mark.parametrize("old", [True, False])
def test_a_bundle_written_with_the_old_key_loads_and_post_processes_as_before(bundle_dir, tmp_path, old):
    from pipeline.predict import Predictor

    folder = shutil.copytree(bundle_dir, tmp_path / "old_bundle")
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["postprocess"] = {"largest_component": True, "tumour_inside_pancreas": old}  # as seg3d wrote it before
    (folder / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    bundle = load_bundle(folder)
    predictor = Predictor.from_bundle(bundle)
    assert inside_rules(predictor.postprocessing, bundle.label_names) == ([(2, 1)] if old else [])
    labels = _organ_tumour_decoys()
    out = postprocess(labels, bundle.label_names, predictor.postprocessing)
    assert not out[50:53, 5:8, 2:4].any() and not out[40:45, 40:45, 30:35].any()
    np.testing.assert_array_equal(out, postprocess(labels, bundle.label_names, PostprocessConfig()))
