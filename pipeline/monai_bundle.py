"""`seg3d export --format monai-bundle`: a trained bundle as a MONAI Bundle that MONAI runs without seg3d.

The folder follows MONAI's bundle specification (docs.monai.io, "MONAI Bundle Specification"):

    configs/metadata.json   the mandatory keys; network_data_format: a CT in HU in, one channel; logits out, one
                            channel per class, each named in channel_def
    configs/inference.json  the whole inference as MONAI components: LoadImaged, the bundle's own preprocessing
                            (pipeline/transforms.py: RAS, body crop, spacing, clip and scaling), SlidingWindowInferer
                            with seg3d's patch, overlap and Gaussian sigma, softmax, back to the input grid as
                            pipeline/grid.py does it, argmax, seg3d's post-processing, SaveImaged
    models/model.ts         the network, traced by pipeline/export.py (checked against PyTorch there)
    models/model.pt         its state dict (building the network for it needs seg3d's attention3d)
    scripts/postprocess.py  seg3d's inversion and post-processing (pipeline/monai_bundle_postprocess.py; no seg3d)
    docs/README.md, LICENSE

`python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT`, run in the
bundle's folder, segments every NIfTI file in IN into OUT/<name>_seg.nii.gz, in the input's grid.

The folder is built beside --output, checked (inference.json and metadata.json parsed by MONAI's ConfigParser, the
network it names loaded and run on a batch against the PyTorch network, the preprocessing and inferer built), and
only then renamed into place; an --output that exists and is not empty is refused before anything is read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bundle import save_state_dict
from pipeline.errors import Seg3dError, one_line
from pipeline.export import REL_TOLERANCE, _bundle_info, export_network, refuse_ensemble
from pipeline.fileio import make_temporary_dir, move_folder_into_place, remove_temporaries, require_output_folder
from pipeline.monai_bundle_docs import LICENSE_TEXT, readme
from pipeline.postprocess import inside_rules

MONAI_BUNDLE = "monai-bundle"
# The schema MONAI's model zoo validates metadata.json against (`python -m monai.bundle verify_metadata`, online).
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
SCRIPT_SOURCE = Path(__file__).with_name("monai_bundle_postprocess.py")
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]  # pipeline.transforms.RAS_LABELS


@dataclass
class MonaiBundleResult:
    path: Path
    model: str
    patch: tuple[int, int, int]
    max_abs_error: float  # inference.json's network_def vs the PyTorch network on a check batch
    logit_scale: float
    seconds: float


def check_bundle_output(output: Path) -> None:
    """Refuse, before any work, an --output that is a file or a folder that is not empty: a bundle is a new folder,
    and export never replaces what a folder holds. What a killed export left beside it is cleared."""
    output = Path(output)
    if output.is_file() or (output.is_symlink() and not output.is_dir()):
        raise Seg3dError(f"--output {output} is a file; a MONAI Bundle is a folder: give a new or empty folder")
    if output.is_dir() and any(output.iterdir()):
        raise Seg3dError(f"--output {output} exists and is not empty; give a new or empty folder (nothing was written)")
    if output.parent.is_dir():
        remove_temporaries(output.parent, names=[output.name])
    require_output_folder(output.parent)


def inference_config(bundle, patch: tuple[int, int, int]) -> dict[str, Any]:
    """configs/inference.json: seg3d's inference path (pipeline/predict.py) as MONAI components."""
    pre, cfg = bundle.preprocessing, bundle.config
    lo, hi = pre.clip
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "ensure_channel_first": True},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": RAS_LABELS},
    ]
    if pre.foreground_crop:
        transforms.append(
            {
                "_target_": "CropForegroundd",
                "keys": "image",
                "source_key": "image",
                "select_fn": f"$lambda x: x > {float(pre.body_threshold_hu)!r}",
                "margin": 2,
                "allow_smaller": True,
            }
        )
    transforms.append(
        {
            "_target_": "Spacingd",
            "keys": "image",
            "pixdim": [float(s) for s in pre.target_spacing],
            "mode": "bilinear",
            "padding_mode": "border",
            "dtype": "$numpy.float32",
        }
    )
    if pre.intensity_mode == "window":
        scale = {"a_min": lo, "a_max": hi, "b_min": -1.0, "b_max": 1.0, "clip": True}
        transforms.append({"_target_": "ScaleIntensityRanged", "keys": "image", **scale})
    else:
        scale = {"a_min": lo, "a_max": hi, "b_min": lo, "b_max": hi, "clip": True}
        transforms.append({"_target_": "ScaleIntensityRanged", "keys": "image", **scale})
        norm = {"subtrahend": float(pre.mean), "divisor": float(pre.std)}
        transforms.append({"_target_": "NormalizeIntensityd", "keys": "image", **norm})
    post = cfg.postprocess
    rules = [list(r) for r in inside_rules(post, pre.label_names)]
    postprocessing: list[dict[str, Any]] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "scripts.postprocess.ResampleToInputd", "keys": "pred", "image_key": "image"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "scripts.postprocess.KeepComponentsd",
            "keys": "pred",
            "largest_component": "@postprocess_largest_component",
            "inside": "@postprocess_inside",
        },
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_dtype": "$numpy.uint8",
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        },
    ]
    inference = cfg.inference
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + glob.glob(os.path.join(@dataset_dir,"
        " '*.nii')))",
        "network_def": "$torch.jit.load(os.path.join(@bundle_root, 'models', 'model.ts'), map_location='cpu')",
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(patch),
            "sw_batch_size": int(inference.sw_batch_size),
            "overlap": float(inference.overlap),
            "mode": "gaussian",
            "sigma_scale": float(inference.sigma_scale),
        },
        # Set to false / [] to skip seg3d's post-processing (what `seg3d infer --no-postprocess` does).
        "postprocess_largest_component": bool(post.largest_component),
        "postprocess_inside": rules,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        # One case at a time: the window runs on (1, 1, X, Y, Z), the rest on the channel-first case.
        "predict": "$lambda d: dict(d, pred=@inferer(d['image'][None].to(@device), @network)[0])",
        "initialize": ["$torch.set_grad_enabled(False)"],
        "run": ["$[@postprocessing(@predict(d))['pred'].meta.get('saved_to') for d in @dataset]"],
    }


def metadata(bundle, patch: tuple[int, int, int], source: str) -> dict[str, Any]:
    """configs/metadata.json with the keys MONAI's bundle specification makes mandatory and the optional ones that
    say where the model came from."""
    import monai
    import nibabel
    import scipy

    from pipeline import __version__

    pre, name = bundle.preprocessing, bundle.config.model.name
    lo, hi = pre.clip
    if pre.intensity_mode == "window":
        value_range = [-1.0, 1.0]
    else:
        value_range = [(lo - pre.mean) / pre.std, (hi - pre.mean) / pre.std]
    classes = {str(i): n for i, n in enumerate(pre.label_names)}
    today = datetime.now(timezone.utc).date().isoformat()
    trained = bundle.metadata.get("created", "?")
    return {
        "schema": SCHEMA,
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by seg3d {__version__} from {source} on {today}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "scipy": scipy.__version__},
        "name": f"seg3d {name}",
        "task": f"Segmentation of {', '.join(pre.label_names[1:])} in abdominal CT",
        "description": (
            f"A seg3d {name} 3D U-Net ({bundle.metadata.get('unet_config', {}).get('skip', '?')} skips), trained by"
            f" seg3d (bundle created {trained}), exported with its own preprocessing, sliding-window inference and"
            " post-processing; see docs/README.md"
        ),
        "authors": "seg3d contributors; trained by the user who ran `seg3d train`",
        "copyright": "Copyright (c) the trainer of the model; seg3d's code is Apache-2.0",
        "data_source": f"the training data of the seg3d run it came from ({source})",
        "data_type": "nibabel",
        "image_classes": f"one channel, CT in Hounsfield units, clipped to [{lo:g}, {hi:g}] HU and scaled",
        "label_classes": ", ".join(f"{v} is {n}" for n, v in zip(pre.label_names, pre.label_values)),
        "pred_classes": f"{pre.num_classes} channels of logits, the label is the argmax: "
        + ", ".join(f"{i} is {n}" for i, n in enumerate(pre.label_names)),
        "intended_use": "Research only, not for clinical or diagnostic use",
        "seg3d": {
            "version": __version__,
            "model": name,
            "source": source,
            "labels": dict(zip(pre.label_names, pre.label_values)),
            "bundle_metadata": bundle.metadata,
        },
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": list(patch),
                    "dtype": "float32",
                    "value_range": value_range,
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "labels",
                    "modality": "n/a",
                    "num_channels": pre.num_classes,
                    "spatial_shape": list(patch),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": classes,
                }
            },
        },
    }


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def build_folder(folder: Path, bundle, patch: tuple[int, int, int], source: str) -> None:
    """Write every file of the MONAI Bundle into the empty `folder`."""
    for sub in ("configs", "models", "docs", "scripts"):
        (folder / sub).mkdir()
    net = bundle.model.to("cpu").float().eval()
    name = bundle.config.model.name
    configs = {"metadata.json": metadata(bundle, patch, source), "inference.json": inference_config(bundle, patch)}
    export_network(
        net,
        folder / "models" / "model.ts",
        fmt="torchscript",
        name=name,
        patch=patch,
        info=_bundle_info(bundle, source),
        # MONAI's own TorchScript bundles carry their configs as extra files (monai.bundle ckpt_export); MONAI Deploy's
        # MonaiBundleInferenceOperator reads them from there.
        extra_files={file: json.dumps(value) for file, value in configs.items()},
    )
    save_state_dict(net, folder / "models" / "model.pt")
    for file, value in configs.items():
        _write_json(folder / "configs" / file, value)
    shutil.copyfile(SCRIPT_SOURCE, folder / "scripts" / "postprocess.py")
    (folder / "scripts" / "__init__.py").write_text("")
    (folder / "docs" / "README.md").write_text(readme(bundle, patch, source))
    (folder / "LICENSE").write_text(LICENSE_TEXT)


def check_folder(folder: Path, net: torch.nn.Module, patch: tuple[int, int, int]) -> tuple[float, float]:
    """Parse the bundle's configs with MONAI's ConfigParser, build its preprocessing and inferer, load `network_def`
    as MONAI would and compare it with `net` on a batch of two patches: (max |difference|, max |logit|)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser["device"] = "$torch.device('cpu')"
    parser.parse()
    for key in ("preprocessing", "inferer"):
        parser.get_parsed_content(key)
    network = parser.get_parsed_content("network")
    x = torch.randn(2, 1, *patch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, exported = net(x).numpy(), network(x).numpy()
    channels = parser.get("_meta_#network_data_format#outputs#pred#num_channels")
    if exported.shape != reference.shape or exported.shape[1] != channels:
        raise Seg3dError(f"the bundle's network_def returns {exported.shape}, the network {reference.shape}")
    return float(np.abs(exported - reference).max()), float(np.abs(reference).max())


def export_monai_bundle(
    model: str | Path,
    output: str | Path,
    *,
    patch: tuple[int, int, int] | None = None,
    tracking_uri: str | None = None,
) -> MonaiBundleResult:
    """Export a seg3d bundle (folder, `runs:/ID/path` or `models:/NAME/VERSION`) as a MONAI Bundle in the new or
    empty folder `output`. Everything the user can get wrong is checked before the bundle is read, and nothing is
    left in place unless every check passed."""
    from pipeline.bundle import load_bundle
    from pipeline.infer import resolve_model

    start = time.perf_counter()
    output = Path(output)
    if not str(model).startswith(("runs:/", "models:/")):
        refuse_ensemble(Path(model), str(model))
    check_bundle_output(output)
    with tempfile.TemporaryDirectory(prefix="seg3d-export-") as workdir:
        folder = resolve_model(str(model), tracking_uri, Path(workdir))
        refuse_ensemble(folder, str(model))
        bundle = load_bundle(folder)
        size = tuple(patch) if patch is not None else tuple(bundle.config.data.patch_size)
        # A post-processing rule naming a class the model lacks is refused here, before anything is written.
        inside_rules(bundle.config.postprocess, bundle.preprocessing.label_names)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temporary_dir(output)
        try:
            build_folder(tmp, bundle, size, str(model))
            try:
                error, scale = check_folder(tmp, bundle.model, size)
            except Seg3dError:
                raise
            except Exception as err:  # MONAI wraps what fails inside a config item in RuntimeError
                reason = f"{type(err).__name__}: {one_line(err)}"
                raise Seg3dError(f"the MONAI Bundle does not load in MONAI ({reason}); nothing was written") from err
            if not error <= REL_TOLERANCE * max(scale, 1.0):
                raise Seg3dError(
                    f"the MONAI Bundle's network differs from the PyTorch network by up to {error:.3g} (logits up to"
                    f" {scale:.3g}); nothing was written"
                )
            if output.is_dir() and any(output.iterdir()):  # filled while we worked: not ours to replace
                raise Seg3dError(f"--output {output} was filled while the bundle was built; nothing was written")
            move_folder_into_place(tmp, output)
        except OSError as err:
            raise Seg3dError(f"cannot write {output} ({err.strerror or err}); choose another --output") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return MonaiBundleResult(
        path=output,
        model=bundle.config.model.name,
        patch=size,
        max_abs_error=error,
        logit_scale=scale,
        seconds=time.perf_counter() - start,
    )
