"""Ensembles of model bundles: the folder that holds one, and the predictor that averages its members.

An ensemble is a folder:

    ensemble.json         {"ensemble_format": 1, "members": [{"name": N, "path": "members/N"}, ...],
                           "labels": {name: value}, "postprocess": true|false, "created": ..., provenance...}
    members/N/            a regular seg3d bundle each (pipeline/bundle.py), with its own preprocessing statistics

At inference every member predicts class probabilities in the input's own voxel grid, each with its own
preprocessing and sliding window, and the ensemble averages them (float32, a running sum: one member's probabilities
in memory at a time beside it), takes the argmax and post-processes once: how nnU-Net ensembles its five folds
(Isensee et al., Nature Methods 2021, "ensembling": softmax averaging). The input is read once for all members.

ensemble.json is data from a file nobody checked (a download from a registry): it is read within a size bound, every
key's type is checked, member paths must be `members/<safe name>` inside the folder with no symlink leading out,
and every member must be a bundle with the same classes in the same order; anything else is one line naming the
file and the key. save_ensemble loads what it wrote before moving it into place, as save_bundle does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bundle import CONFIG, METADATA, PREPROCESSING, WEIGHTS, Bundle, load_bundle
from pipeline.config import PostprocessConfig
from pipeline.errors import Seg3dError, one_line, shown
from pipeline.fileio import fsync_dir, inside, make_temporary_dir, move_folder_into_place
from pipeline.grid import argmax_classes
from pipeline.names import is_safe_name
from pipeline.postprocess import inside_rules, postprocess
from pipeline.predict import Prediction, Predictor
from pipeline.transforms import Preprocessing
from pipeline.yamlio import read_text

ENSEMBLE_FILE, MEMBERS = "ensemble.json", "members"
ENSEMBLE_FORMAT = 1
MAX_MEMBERS = 64  # 5 folds of a dozen variants; more is not an ensemble anyone deploys
MAX_ENSEMBLE_JSON = 64 * 1024  # 64 members' names and paths are a few kB
MAX_MEMBER_NAME = 64
DAMAGED = "the ensemble is damaged: write it again (seg3d study, or pipeline.ensemble.save_ensemble)"


@dataclass
class Ensemble:
    """Member bundles (name -> Bundle, in order) whose class probabilities are averaged; `postprocess` says whether
    the first member's post-processing rules run on the averaged labels."""

    members: dict[str, Bundle]
    postprocess: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)  # ensemble.json as read; {} for an ad-hoc ensemble
    path: Path | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """The first member's: what the members share (class names and values) is all a writer reads from it."""
        return next(iter(self.members.values())).preprocessing

    @property
    def label_names(self) -> list[str]:
        return self.preprocessing.label_names

    @property
    def postprocess_config(self) -> PostprocessConfig:
        return next(iter(self.members.values())).config.postprocess


def is_ensemble(folder: Path | str) -> bool:
    return os.path.lexists(Path(folder) / ENSEMBLE_FILE)


def model_name(model: Bundle | Ensemble) -> str:
    """The model as outputs name it (a DICOM SEG's algorithm, an overlay's title)."""
    if isinstance(model, Bundle):
        return model.config.model.name
    names = sorted({b.config.model.name for b in model.members.values()})
    full = f"ensemble of {len(model.members)} ({', '.join(names)})"
    # A DICOM SEG takes 64 characters for the name, after "seg3d ".
    return full if len(full) <= 58 else f"ensemble of {len(model.members)} ({len(names)} variants)"


def _labels(bundle: Bundle) -> dict[str, int]:
    return dict(zip(bundle.preprocessing.label_names, bundle.preprocessing.label_values))


def _listed(labels: dict) -> str:
    """Labels in their order (a repr of the dict would sort them), shortened: they come from files."""
    return shown(", ".join(f"{name}={value}" for name, value in labels.items()), 100).strip("'\"")


def _check_same_labels(members: dict[str, Bundle], where: str) -> dict[str, int]:
    """The members' shared labels; class probabilities are averaged channel by channel, so the classes and their
    order must be the same in every member."""
    (first, bundle), *rest = members.items()
    labels = _labels(bundle)
    for name, other in rest:
        if list(_labels(other).items()) != list(labels.items()):
            raise Seg3dError(
                f"{where}: members {shown(first)} ({bundle.path}: {_listed(labels)}) and {shown(name)} ({other.path}:"
                f" {_listed(_labels(other))}) have different labels; an ensemble averages class probabilities, so"
                " every member must have the same classes in the same order"
            )
    return labels


def check_member_name(name: object, where: str) -> str:
    if not is_safe_name(name, MAX_MEMBER_NAME):
        raise Seg3dError(
            f"{where}: member name {shown(name)} is not a safe folder name; use letters, digits, '_', '.', '-', '+'"
            f" and spaces, starting with a letter, digit or '_', at most {MAX_MEMBER_NAME} characters"
        )
    return name


# -- writing ----------------------------------------------------------------------------------------------------------


def save_ensemble(
    folder: Path, members: dict[str, Path], *, postprocess: bool, provenance: dict[str, Any] | None = None
) -> Path:
    """Copy the member bundles (name -> bundle folder) into a temporary sibling of `folder`, write ensemble.json,
    load the result back with every check of load_model, then move it into place; an ensemble that would not load
    is never written (a Seg3dError says why, and the one already there stays)."""
    folder = Path(folder)
    where = f"ensemble {folder}"
    if not members or len(members) > MAX_MEMBERS:
        raise Seg3dError(f"{where}: an ensemble holds 1 to {MAX_MEMBERS} member bundles, got {len(members)}")
    for name, source in members.items():
        check_member_name(name, where)
        if is_ensemble(source):
            raise Seg3dError(f"{where}: member {shown(name)} ({source}) is an ensemble; give its members instead")
    bundles = {name: load_bundle(source) for name, source in members.items()}  # errors name the source bundle
    labels = _check_same_labels(bundles, where)
    del bundles
    reserved = ("ensemble_format", "members", "labels", "postprocess", "created")
    clash = next((k for k in provenance or {} if k in reserved), None)
    if clash is not None:
        raise Seg3dError(f"{where}: provenance key {clash!r} is one of ensemble.json's own keys; rename it")
    record = {
        "ensemble_format": ENSEMBLE_FORMAT,
        "members": [{"name": name, "path": f"{MEMBERS}/{name}"} for name in members],
        "labels": labels,
        "postprocess": bool(postprocess),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(provenance or {}),
    }
    if folder.exists() and not is_ensemble(folder) and (not folder.is_dir() or any(folder.iterdir())):
        raise Seg3dError(f"{where}: the folder exists and holds no ensemble; choose another folder (nothing written)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temporary_dir(folder)
    try:
        for name, source in members.items():
            (tmp / MEMBERS / name).mkdir(parents=True)
            for file in (WEIGHTS, CONFIG, PREPROCESSING, METADATA):  # the bundle's files, nothing else it holds
                shutil.copyfile(Path(source) / file, tmp / MEMBERS / name / file)
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2))
        _fsync_tree(tmp)
        try:
            with torch.random.fork_rng(devices=[]):  # building the check's networks must not move the caller's RNG
                _load_ensemble(tmp, shown_as=folder, device="cpu")
        except Seg3dError as err:
            reason = str(err).removesuffix(f"; {DAMAGED}")
            raise Seg3dError(f"not writing {reason}: the ensemble would not load (one already there is kept)") from None
        move_folder_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


# -- reading ----------------------------------------------------------------------------------------------------------


def load_model(path: Path | str, device: str | torch.device = "cpu") -> Bundle | Ensemble:
    """A bundle folder, or an ensemble folder (one holding ensemble.json)."""
    folder = Path(path)
    if is_ensemble(folder):
        if not folder.is_dir():
            raise Seg3dError(f"ensemble {folder} not found")
        return _load_ensemble(folder, shown_as=folder, device=device)
    return load_bundle(folder, device=device)


def adhoc_ensemble(folders: list[Path], shown_as: list[str], device: str | torch.device = "cpu") -> Ensemble:
    """Bundles given one by one (`seg3d infer --model A --model B`) as an ensemble with post-processing on."""
    members: dict[str, Bundle] = {}
    for folder, given in zip(folders, shown_as):
        if is_ensemble(folder):
            raise Seg3dError(
                f"--model {given} is an ensemble; give it alone, or its members one --model each"
                f" ({given}/{MEMBERS}/NAME)"
            )
        members[f"{len(members)}: {given}"] = load_bundle(folder, device=device)
    _check_same_labels(members, "--model")
    return Ensemble(members=members, postprocess=True)


def _load_ensemble(folder: Path, shown_as: Path, device: str | torch.device) -> Ensemble:
    """Read and check the ensemble in `folder`, naming it `shown_as` in messages (save_ensemble checks a temporary)."""
    path = folder / ENSEMBLE_FILE
    where = f"ensemble {shown_as}: {ENSEMBLE_FILE}"
    if path.is_symlink() or not path.is_file():
        raise Seg3dError(f"{where} is not a regular file (a symlink, a folder or a device); {DAMAGED}")
    try:
        record = json.loads(read_text(path, where, limit=MAX_ENSEMBLE_JSON))
    except (ValueError, RecursionError) as err:  # bad JSON, a 5000-digit integer, nesting without end
        raise Seg3dError(f"{where}: not valid JSON ({one_line(err, 80)}); {DAMAGED}") from None
    if not isinstance(record, dict):
        raise Seg3dError(f"{where}: must be a JSON object, got {type(record).__name__}; {DAMAGED}")
    fmt = record.get("ensemble_format")
    if type(fmt) is not int or fmt != ENSEMBLE_FORMAT:
        raise Seg3dError(
            f"{where}: 'ensemble_format' is {shown(fmt)}, this seg3d reads format {ENSEMBLE_FORMAT}; use a matching"
            " seg3d version"
        )
    entries = record.get("members")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_MEMBERS:
        got = f"{len(entries)} entries" if isinstance(entries, list) else shown(entries)
        raise Seg3dError(f"{where}: 'members' must be a list of 1 to {MAX_MEMBERS} members, got {got}; {DAMAGED}")
    labels = record.get("labels")
    if not isinstance(labels, dict) or not labels or any(type(v) is not int for v in labels.values()):
        raise Seg3dError(f"{where}: 'labels' must be an object of class name -> integer value; {DAMAGED}")
    if not isinstance(record.get("postprocess"), bool):
        raise Seg3dError(
            f"{where}: 'postprocess' must be true or false, got {shown(record.get('postprocess'))}; {DAMAGED}"
        )
    names = [_member_folder(folder, entry, where=f"{where}: 'members'[{i}]") for i, entry in enumerate(entries)]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise Seg3dError(f"{where}: 'members' names {shown(duplicate)} twice; {DAMAGED}")
    members: dict[str, Bundle] = {}
    for name in names:
        member = folder / MEMBERS / name
        try:
            members[name] = load_bundle(member, device=device)
        except Seg3dError as err:  # the temporary save_ensemble checks is named as the folder it becomes
            raise Seg3dError(
                f"ensemble {shown_as}: member {shown(name)}: {str(err).replace(str(folder), str(shown_as))}"
            ) from None
    shared = _check_same_labels(members, f"ensemble {shown_as}")
    if list(labels.items()) != list(shared.items()):
        raise Seg3dError(
            f"{where}: 'labels' ({_listed(labels)}) are not the members' labels ({_listed(shared)}); {DAMAGED}"
        )
    return Ensemble(members=members, postprocess=record["postprocess"], metadata=record, path=Path(shown_as))


def _member_folder(folder: Path, entry: object, where: str) -> str:
    """The member's name, once its entry is {"name": safe name, "path": "members/<name>"} and that folder is a real
    folder inside the ensemble (no symlink on the way out of it)."""
    if not isinstance(entry, dict):
        raise Seg3dError(f"{where}: must be an object {{'name': ..., 'path': ...}}, got {shown(entry)}; {DAMAGED}")
    name = check_member_name(entry.get("name"), where)
    expected = f"{MEMBERS}/{name}"
    if entry.get("path") != expected:
        raise Seg3dError(
            f"{where}: 'path' is {shown(entry.get('path'))}, a member's path must be {expected!r} (inside the"
            f" ensemble's own folder); {DAMAGED}"
        )
    member = folder / MEMBERS / name
    if (folder / MEMBERS).is_symlink() or member.is_symlink() or not inside(folder, member):
        raise Seg3dError(f"{where}: {expected} is a symlink (or leads out of the ensemble's folder); refused")
    if not member.is_dir():
        raise Seg3dError(f"{where}: member folder {expected} is missing; {DAMAGED}")
    linked = next((f for f in (WEIGHTS, CONFIG, PREPROCESSING, METADATA) if (member / f).is_symlink()), None)
    if linked is not None:
        raise Seg3dError(f"{where}: {expected}/{linked} is a symlink; an ensemble holds its members' files; refused")
    return name


# -- prediction -------------------------------------------------------------------------------------------------------


class EnsemblePredictor:
    """Predictor.predict_file for an ensemble: the input read once, each member's class probabilities in the input's
    grid (its own preprocessing and sliding window, no post-processing), their mean, argmax, post-processing."""

    def __init__(self, members: list[Predictor], *, postprocessing: PostprocessConfig | None):
        if not members:
            raise Seg3dError("an ensemble needs at least one member")
        self.members = members
        self.pre = members[0].pre
        if postprocessing is not None:
            inside_rules(postprocessing, self.pre.label_names)
        self.postprocessing = postprocessing

    @property
    def has_gates(self) -> bool:
        """Only an ensemble of one has a gate map to show: several members would have one each."""
        return len(self.members) == 1 and self.members[0].has_gates

    @classmethod
    def from_ensemble(
        cls,
        ensemble: Ensemble,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        tta: bool = False,
        postprocess: bool = True,
        overlap: float | None = None,
        backend: str = "torch",
        notes: Callable[[str], None] | None = None,
    ) -> EnsemblePredictor:
        """`postprocess` False (--no-postprocess) turns the ensemble's own post-processing off; True keeps it as the
        ensemble says. An ensemble of one runs its member exactly as a single bundle would (same labels, same speed)."""
        postprocess = postprocess and ensemble.postprocess
        single = len(ensemble.members) == 1
        predictors = [
            Predictor.from_bundle(
                bundle,
                device=device,
                precision=precision,
                tta=tta,
                postprocess=postprocess and single,
                overlap=overlap,
                backend=backend,
                notes=notes,
            )
            for bundle in ensemble.members.values()
        ]
        return cls(predictors, postprocessing=ensemble.postprocess_config if postprocess and not single else None)

    def predict_file(
        self,
        image: Path | str,
        case: str | None = None,
        probabilities: bool = False,
        gates: bool = False,
        notes: Callable[[str], None] | None = None,
    ) -> Prediction:
        """As Predictor.predict_file; `probabilities` are the members' mean, and there is no gate map."""
        if len(self.members) == 1:
            return self.members[0].predict_file(image, case=case, probabilities=probabilities, gates=gates, notes=notes)
        start = time.perf_counter()
        name = case or Path(image).name
        volume = self.members[0].read_input(image, case=name, notes=notes)
        timings = {"load": time.perf_counter() - start}
        total: torch.Tensor | None = None  # (K, *S) float32 in the input grid: the running sum
        affine = volume.affine
        for member in self.members:
            pred = member.predict_volume(volume, case=name, probabilities=True)
            for stage, seconds in pred.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
            probs = torch.from_numpy(pred.probabilities).float()
            affine = pred.affine
            del pred  # one member's probabilities at a time beside the sum
            total = probs if total is None else total.add_(probs)
            del probs
        start = time.perf_counter()
        total /= len(self.members)
        labels = argmax_classes(total).numpy()
        if self.postprocessing is not None:
            labels = postprocess(labels, self.pre.label_names, self.postprocessing)
        mean = total.numpy() if probabilities else None
        del total
        timings["invert"] = timings.get("invert", 0.0) + time.perf_counter() - start
        return Prediction(labels, np.asarray(affine), mean, None, timings, source=volume.source)


def make_predictor(
    model: Bundle | Ensemble,
    *,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    tta: bool = False,
    postprocess: bool = True,
    overlap: float | None = None,
    backend: str = "torch",
    notes: Callable[[str], None] | None = None,
) -> Predictor | EnsemblePredictor:
    """The predictor `seg3d infer` runs: a bundle's own Predictor, or an ensemble's."""
    settings = dict(device=device, precision=precision, tta=tta, postprocess=postprocess, overlap=overlap)
    if isinstance(model, Ensemble):
        return EnsemblePredictor.from_ensemble(model, **settings, backend=backend, notes=notes)
    return Predictor.from_bundle(model, **settings, backend=backend, notes=notes)
