"""Ensembles on real files: the average against the members' own predictions, `seg3d infer --model` given several
times, hostile ensemble.json files, export's refusal, and the `champion` alias in a real sqlite MLflow registry."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from attention3d import create_model
from pipeline.bundle import load_bundle, save_bundle
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.ensemble import (
    ENSEMBLE_FILE,
    MAX_ENSEMBLE_JSON,
    MAX_MEMBERS,
    Ensemble,
    EnsemblePredictor,
    load_model,
    save_ensemble,
)
from pipeline.errors import Seg3dError
from pipeline.postprocess import postprocess
from pipeline.predict import Predictor
from pipeline.synthetic import CaseSpec, make_phantom, to_nifti
from tests.pipeline.conftest import PRE, TINY

SPEC = CaseSpec(shape=(48, 48, 16), spacing=(0.9, 0.9, 2.5), orientation="LPS", tumour=True, decoys=1)


def _bundle(folder: Path, seed: int, pre=PRE) -> Path:
    torch.manual_seed(seed)
    cfg = load_config(None, ["model.name=attention_unet", *TINY])
    model = create_model("attention_unet", channels=(4, 8, 16), strides=(2, 2), out_channels=len(pre.label_names))
    return save_bundle(folder, model, cfg, pre)


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory) -> Path:
    """Other weights and other intensity statistics than bundle_dir (its own preprocessing), the same classes."""
    return _bundle(tmp_path_factory.mktemp("other") / "bundle", seed=1, pre=dataclasses.replace(PRE, mean=80, std=60))


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    image, _, affine = make_phantom(np.random.default_rng(3), SPEC)
    path = tmp_path_factory.mktemp("ct") / "case_LPS.nii.gz"
    nib.save(to_nifti(image, affine, "LPS"), path)
    return path


@pytest.fixture(scope="module")
def ensemble_dir(bundle_dir, other_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ensemble") / "ens"
    return save_ensemble(folder, {"a": bundle_dir, "b": other_bundle}, postprocess=False, provenance={"study": "t"})


@pytest.fixture(scope="module")
def member_probs(bundle_dir, other_bundle, ct) -> list[np.ndarray]:
    """Each member's own predict_file probabilities, from bundles loaded apart from any ensemble."""
    out = []
    for folder in (bundle_dir, other_bundle):
        predictor = Predictor.from_bundle(load_bundle(folder), postprocess=False)
        out.append(predictor.predict_file(ct, probabilities=True).probabilities)
    return out


def _assert_same_geometry(source: Path, out: Path) -> None:
    a, b = nib.load(source), nib.load(out)
    assert a.shape[:3] == b.shape and b.get_data_dtype() == np.uint8
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    np.testing.assert_allclose(b.get_qform(), a.get_qform(), atol=1e-6)


def _infer(tmp_path: Path, ct: Path, *models: Path | str, extra: tuple[str, ...] = ()) -> tuple[int, Path]:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}.nii.gz"
    argv = ["infer", *[a for m in models for a in ("--model", str(m))], "--input", str(ct), "--output", str(out)]
    return main([*argv, *extra]), out


# -- the average ------------------------------------------------------------------------------------------------------


def test_the_ensembles_probabilities_are_the_mean_of_its_members(ensemble_dir, member_probs, ct):
    pa, pb = member_probs
    assert np.abs(pa - pb).max() > 1e-2, "the two members must differ for the mean to mean anything"
    ensemble = load_model(ensemble_dir)
    assert isinstance(ensemble, Ensemble) and list(ensemble.members) == ["a", "b"]
    assert ensemble.metadata["study"] == "t"
    assert ensemble.metadata["labels"] == {"background": 0, "pancreas": 1, "cancer": 2}
    pred = EnsemblePredictor.from_ensemble(ensemble).predict_file(ct, probabilities=True)
    mean = (pa.astype(np.float64) + pb) / 2
    assert pred.probabilities.dtype == np.float32 and pred.probabilities.shape == (3, *nib.load(ct).shape)
    np.testing.assert_allclose(pred.probabilities, mean, atol=1e-5)
    np.testing.assert_allclose(pred.affine, nib.load(ct).affine, atol=1e-6)
    top2 = np.sort(mean, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4  # voxels whose argmax float rounding cannot change
    np.testing.assert_array_equal(pred.labels[clear], np.argmax(mean, axis=0)[clear])
    assert set(pred.timings) >= {"load", "preprocess", "network", "stitch", "invert"}

    # With post-processing: the first member's rules on the averaged argmax.
    on = EnsemblePredictor.from_ensemble(dataclasses.replace(ensemble, postprocess=True)).predict_file(ct)
    rules = ensemble.members["a"].config.postprocess
    np.testing.assert_array_equal(on.labels, postprocess(pred.labels, ensemble.label_names, rules))


def test_an_ensemble_of_one_gives_exactly_the_members_labels(bundle_dir, ct, tmp_path):
    one = load_model(save_ensemble(tmp_path / "one", {"only": bundle_dir}, postprocess=True))
    member = Predictor.from_bundle(load_bundle(bundle_dir)).predict_file(ct, probabilities=True)
    got = EnsemblePredictor.from_ensemble(one).predict_file(ct, probabilities=True)
    np.testing.assert_array_equal(got.labels, member.labels)
    np.testing.assert_array_equal(got.probabilities, member.probabilities)

    # The averaging path, on the input read once and shared: two copies of one member are that member.
    twice = load_model(save_ensemble(tmp_path / "twice", {"x": bundle_dir, "y": bundle_dir}, postprocess=True))
    got = EnsemblePredictor.from_ensemble(twice).predict_file(ct, probabilities=True)
    np.testing.assert_allclose(got.probabilities, member.probabilities, atol=1e-6)
    np.testing.assert_array_equal(got.labels, member.labels)


# -- seg3d infer ------------------------------------------------------------------------------------------------------


def test_infer_with_model_twice_writes_the_mean_in_the_inputs_geometry(
    bundle_dir, other_bundle, ensemble_dir, member_probs, ct, tmp_path, capsys
):
    code, out = _infer(tmp_path, ct, bundle_dir, other_bundle, extra=("--save-probabilities", "--no-postprocess"))
    assert code == 0
    assert "ensemble of 2 models" in capsys.readouterr().out
    _assert_same_geometry(ct, out)
    saved = np.load(out.with_name("out0_probabilities.npz"))
    np.testing.assert_allclose(
        saved["probabilities"].astype(np.float32), (member_probs[0] + member_probs[1]) / 2, atol=1e-3
    )

    # The ensemble folder (post-processing off in its ensemble.json) gives the same mask.
    code, folder_out = _infer(tmp_path, ct, ensemble_dir)
    assert code == 0 and "ensemble of 2 models" in capsys.readouterr().out
    np.testing.assert_array_equal(nib.load(folder_out).get_fdata(), nib.load(out).get_fdata())

    # A single plain bundle: no ensemble in the summary.
    code, _ = _infer(tmp_path, ct, bundle_dir)
    assert code == 0 and "ensemble" not in capsys.readouterr().out


def test_an_ensemble_among_several_models_is_refused(bundle_dir, ensemble_dir, ct, tmp_path, capsys):
    code, out = _infer(tmp_path, ct, bundle_dir, ensemble_dir)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "is an ensemble" in err and not out.exists()


# -- hostile ensemble.json ------------------------------------------------------------------------------------------


def _edit(record: dict, **changes) -> dict:
    return {**record, **changes}


def _member(record: dict, index: int, **changes) -> dict:
    members = [dict(m) for m in record["members"]]
    members[index].update(changes)
    return {**record, "members": members}


HOSTILE = {
    "parent path": (lambda r: _member(r, 1, path="../x"), "'members'[1]: 'path'"),
    "absolute path": (lambda r: _member(r, 0, path="/etc"), "'members'[0]: 'path'"),
    "unsafe name": (lambda r: _member(r, 0, name="../a", path="members/../a"), "member name"),
    "name not text": (lambda r: _member(r, 0, name=5), "member name 5"),
    "members not a list": (lambda r: _edit(r, members="a,b"), "'members' must be a list"),
    "no members": (lambda r: _edit(r, members=[]), "'members' must be a list of 1 to"),
    "too many members": (
        lambda r: _edit(r, members=r["members"] * (MAX_MEMBERS // 2 + 1)),
        f"{2 * (MAX_MEMBERS // 2 + 1)} entries",
    ),
    "duplicate member": (lambda r: _edit(r, members=[r["members"][0]] * 2), "names 'a' twice"),
    "postprocess not bool": (lambda r: _edit(r, postprocess="yes"), "'postprocess' must be true or false"),
    "format text": (lambda r: _edit(r, ensemble_format="1"), "'ensemble_format' is '1'"),
    "format bool": (lambda r: _edit(r, ensemble_format=True), "'ensemble_format' is True"),
    "labels a list": (lambda r: _edit(r, labels=["background"]), "'labels' must be an object"),
    "labels not the members'": (lambda r: _edit(r, labels={"background": 0, "liver": 1, "cancer": 2}), "'labels'"),
    "not an object": (lambda r: [r], "must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_ensemble_json_is_one_line_exit_2_and_no_output(case, ensemble_dir, ct, tmp_path, capsys):
    edit, expected = HOSTILE[case]
    folder = shutil.copytree(ensemble_dir, tmp_path / "ens")
    record = json.loads((folder / ENSEMBLE_FILE).read_text())
    (folder / ENSEMBLE_FILE).write_text(json.dumps(edit(record)))
    _assert_refused(tmp_path, ct, folder, capsys, expected)


def _assert_refused(tmp_path: Path, ct: Path, folder: Path, capsys, expected: str) -> str:
    code, out = _infer(tmp_path, ct, folder)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("seg3d infer: error: ") and "\n" not in err and len(err) < 600, err
    assert expected in err and str(folder) in err, err
    assert not out.exists() and not list(tmp_path.glob("out*"))
    return err


def test_damaged_ensemble_folders_are_refused_in_one_line(ensemble_dir, bundle_dir, ct, tmp_path, capsys):
    def fresh(name: str) -> Path:
        return shutil.copytree(ensemble_dir, tmp_path / name)

    folder = fresh("missing")
    shutil.rmtree(folder / "members" / "b")
    _assert_refused(tmp_path, ct, folder, capsys, "member folder members/b is missing")

    folder = fresh("huge")
    record = json.loads((folder / ENSEMBLE_FILE).read_text())
    (folder / ENSEMBLE_FILE).write_text(json.dumps({**record, "note": "x" * MAX_ENSEMBLE_JSON}))
    _assert_refused(tmp_path, ct, folder, capsys, "larger than 64 KiB")

    folder = fresh("garbage")
    (folder / ENSEMBLE_FILE).write_bytes(b'{"members": [')
    _assert_refused(tmp_path, ct, folder, capsys, "not valid JSON")

    folder = fresh("linked")  # a member that is a symlink to a bundle outside the ensemble
    shutil.rmtree(folder / "members" / "b")
    (folder / "members" / "b").symlink_to(bundle_dir, target_is_directory=True)
    _assert_refused(tmp_path, ct, folder, capsys, "symlink")

    folder = fresh("linked-file")
    (folder / "members" / "b" / "model.safetensors").unlink()
    (folder / "members" / "b" / "model.safetensors").symlink_to(bundle_dir / "model.safetensors")
    _assert_refused(tmp_path, ct, folder, capsys, "members/b/model.safetensors is a symlink")

    folder = fresh("damaged-member")
    (folder / "members" / "b" / "config.yaml").unlink()
    _assert_refused(tmp_path, ct, folder, capsys, "member 'b': model bundle")


def test_a_member_with_other_labels_is_refused(ensemble_dir, tmp_path, ct, capsys):
    liver = _bundle(tmp_path / "liver", seed=2, pre=dataclasses.replace(PRE, label_names=["background", "liver", "x"]))
    folder = shutil.copytree(ensemble_dir, tmp_path / "ens")
    for f in liver.iterdir():
        shutil.copyfile(f, folder / "members" / "b" / f.name)
    err = _assert_refused(tmp_path, ct, folder, capsys, "different labels")
    assert "members 'a'" in err and "and 'b'" in err


def test_save_ensemble_refuses_members_with_other_labels_and_writes_nothing(bundle_dir, tmp_path):
    liver = _bundle(tmp_path / "liver", seed=2, pre=dataclasses.replace(PRE, label_names=["background", "liver", "x"]))
    target = tmp_path / "out" / "ens"
    with pytest.raises(Seg3dError) as err:
        save_ensemble(target, {"organs": bundle_dir, "liver": liver}, postprocess=True)
    message = str(err.value)
    assert "\n" not in message and "different labels" in message
    assert str(bundle_dir) in message and str(liver) in message and "'organs'" in message and "'liver'" in message
    assert not target.exists() and not list(target.parent.glob(".*"))
    with pytest.raises(Seg3dError, match=r"member name '\.\./x' is not a safe folder name"):
        save_ensemble(target, {"../x": bundle_dir}, postprocess=True)
    with pytest.raises(Seg3dError, match="provenance key 'members'"):
        save_ensemble(target, {"a": bundle_dir}, postprocess=True, provenance={"members": 1})
    assert not target.exists()
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(Seg3dError, match="the folder exists and holds no ensemble"):
        save_ensemble(target, {"a": bundle_dir}, postprocess=True)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_save_ensemble_replaces_an_old_one_whole(bundle_dir, other_bundle, tmp_path):
    target = save_ensemble(tmp_path / "ens", {"a": bundle_dir, "b": other_bundle}, postprocess=True)
    save_ensemble(target, {"c": other_bundle}, postprocess=False)
    again = load_model(target)
    assert list(again.members) == ["c"] and again.postprocess is False
    assert sorted(p.name for p in (target / "members").iterdir()) == ["c"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- export and the registry ----------------------------------------------------------------------------------------


def test_export_refuses_an_ensemble_and_names_a_member(ensemble_dir, tmp_path, capsys):
    out = tmp_path / "exports" / "model.onnx"
    code = main(["export", "--model", str(ensemble_dir), "--format", "onnx", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and str(ensemble_dir) in err, err
    assert f"--model {ensemble_dir}/members/a" in err
    assert not (tmp_path / "exports").exists()


def test_the_champion_alias_round_trip(bundle_dir, ct, tmp_path):
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    champion = save_ensemble(tmp_path / "champion", {"fold0": bundle_dir, "fold1": bundle_dir}, postprocess=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "ensemble-test", tmp_path / "run")
    tracker.start("study", tags={})
    tracker.log_artifacts(champion, "champion")
    version = tracker.register_model("champion", "seg3d-ensemble-test", alias="champion")
    tracker.end()
    assert version is not None
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("seg3d-ensemble-test", "champion").version) == version

    code, got = _infer(tmp_path, ct, "models:/seg3d-ensemble-test@champion", extra=("--tracking-uri", uri))
    assert code == 0
    _assert_same_geometry(ct, got)
    code, local = _infer(tmp_path, ct, champion)
    assert code == 0
    np.testing.assert_array_equal(nib.load(got).get_fdata(), nib.load(local).get_fdata())
