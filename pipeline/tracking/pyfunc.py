"""Make a bundle folder an MLflow model in place: `MLmodel` (python_function flavour, loader pipeline.mlflow_model,
the signature of its input and output tables), `python_env.yaml` and `requirements.txt`.

The weights stay where they are, in the bundle's own files: the registered model version *is* the bundle folder, so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")`, `mlflow models predict -m models:/NAME/VERSION ... --env-manager
local` and `seg3d infer --model models:/NAME@ALIAS` all read the same bytes. seg3d itself is not on PyPI, so the
environment that loads the model is the one seg3d is installed in (`--env-manager local`); requirements.txt pins
what the bundle was made with, for the record and for `mlflow models build-docker` on a machine with seg3d's wheel.
"""

from __future__ import annotations

import platform
from pathlib import Path

import mlflow.pyfunc
import yaml
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import ColSpec, Schema
from mlflow.utils.environment import _PythonEnv

from pipeline.fileio import atomic_write_text
from pipeline.mlflow_model import INPUT_COLUMNS, OUTPUT_COLUMNS

MLMODEL, PYTHON_ENV, REQUIREMENTS = "MLmodel", "python_env.yaml", "requirements.txt"
LOADER = "pipeline.mlflow_model"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", name) for name in INPUT_COLUMNS]),
    outputs=Schema([ColSpec("string", name) for name in OUTPUT_COLUMNS]),
)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "monai", "mlflow", "nibabel", "SimpleITK", "pydicom", "highdicom", "safetensors"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def write_mlmodel(folder: Path, *, name: str) -> Path:
    """Write the MLflow model files into the bundle (or ensemble) `folder` (each atomically; MLmodel last, so an
    MLmodel means the set is complete). `name` (the model variant) goes into MLmodel's metadata. Returns MLmodel."""
    folder = Path(folder)
    model = Model(signature=SIGNATURE, metadata={"seg3d_model": name, "input": "CT file paths", "output": "mask paths"})
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER, python_env=PYTHON_ENV)
    comment = "# seg3d itself (not on PyPI) must be installed too; load with --env-manager local in its environment\n"
    atomic_write_text(folder / REQUIREMENTS, comment + "\n".join(_requirements()) + "\n")
    env = _PythonEnv(python=platform.python_version(), build_dependencies=["pip"], dependencies=[f"-r {REQUIREMENTS}"])
    atomic_write_text(folder / PYTHON_ENV, yaml.safe_dump(env.to_dict(), sort_keys=False))
    atomic_write_text(folder / MLMODEL, model.to_yaml())
    return folder / MLMODEL
