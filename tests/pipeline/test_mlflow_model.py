"""The registered bundle is an MLflow pyfunc model, checked by MLflow itself: `mlflow.pyfunc.load_model` in a fresh
process and `mlflow models predict --env-manager local` write the mask `seg3d infer` writes, from the one copy of the
weights that training logged; the registry uses the alias `candidate`, not stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.tracking.store import scoped_env
from tests.pipeline._training import mlflow_client, phantom_data, tiny_cfg

NAME = "seg3d-pyfunc-test"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, run id) of a tiny training run whose bundle is registered as NAME."""
    from pipeline.train import train

    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_cfg(f"registered_model={NAME}", "experiment=pyfunc-test", "train.epochs=1")
    result = train(cfg, phantom_data(root / "data"), root / "run", tracking_uri=uri, progress=False)
    assert result.registered_version == "1"
    return uri, result.run_id


def _env(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"}


def _seg3d_infer(uri: str, ct: Path, out: Path) -> np.ndarray:
    code = main(
        ["infer", "--model", f"models:/{NAME}/1", "--tracking-uri", uri, "--input", str(ct), "--output", str(out)]
    )
    assert code == 0
    return np.asarray(nib.load(out).dataobj)


def _same_mask(got: Path, expected: np.ndarray, source: Path) -> None:
    image, reference = nib.load(got), nib.load(source)
    assert image.shape == reference.shape and np.allclose(image.affine, reference.affine)
    assert np.array_equal(np.asarray(image.dataobj), expected)


def test_the_registered_version_is_the_logged_bundle_with_an_alias_and_a_signature(trained, tmp_path):
    import mlflow

    uri, run_id = trained
    client = mlflow_client(uri)
    version = client.get_model_version_by_alias(NAME, "candidate")
    assert str(version.version) == "1" and version.source.endswith("/bundle") and version.run_id == run_id
    # One copy of the weights in the run: the pyfunc files sit beside them in the bundle folder.
    files = [a.path for a in client.list_artifacts(run_id, "bundle")]
    assert {"bundle/MLmodel", "bundle/model.safetensors", "bundle/python_env.yaml", "bundle/requirements.txt"} <= set(
        files
    )
    everything = []
    stack = [None]
    while stack:
        for artifact in client.list_artifacts(run_id, stack.pop()):
            (stack.append(artifact.path) if artifact.is_dir else everything.append(artifact.path))
    assert [p for p in everything if p.endswith(".safetensors")] == ["bundle/model.safetensors"]
    # models:/ resolves through the process-wide registry URI: set it for this call only (mlflow.set_registry_uri
    # would leak into every later test of the session and send their models:/ lookups to this store).
    with scoped_env({"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}):
        info = mlflow.models.get_model_info(f"models:/{NAME}@candidate")
    assert info.flavors["python_function"]["loader_module"] == "pipeline.mlflow_model"
    assert info.signature.inputs.input_names() == ["image", "output"]
    assert info.signature.outputs.input_names() == ["image", "mask", "error"]


def test_load_model_in_a_fresh_process_writes_the_mask_seg3d_infer_writes(trained, real_ct, tmp_path):
    uri, _ = trained
    ct = real_ct / "ct_small.nii.gz"
    expected = _seg3d_infer(uri, ct, tmp_path / "infer.nii.gz")
    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@candidate')\n"
        "image, out = sys.argv[1:3]\n"
        "rows = pd.DataFrame({'image': [image, image + '.missing'], 'output': [out, out]})\n"
        "print(json.dumps(model.predict(rows).to_dict(orient='records')))\n"
    )
    out = tmp_path / "pyfunc"
    done = subprocess.run(
        [sys.executable, "-c", script, str(ct), str(out)],
        env=_env(uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    good, bad = json.loads(done.stdout.strip().splitlines()[-1])
    assert good["error"] == "" and Path(good["mask"]) == out / "ct_small.nii.gz"
    _same_mask(Path(good["mask"]), expected, ct)
    # A row that fails says why in one line, and the other rows still run.
    assert bad["mask"] == "" and "ct_small.nii.gz.missing" in bad["error"] and "\n" not in bad["error"]


def test_mlflow_models_predict_writes_the_mask_seg3d_infer_writes(trained, real_ct, tmp_path):
    uri, _ = trained
    ct = real_ct / "ct_small.nii.gz"
    expected = _seg3d_infer(uri, ct, tmp_path / "infer.nii.gz")
    request = tmp_path / "input.json"
    mask = tmp_path / "predicted" / "mask.nii.gz"
    request.write_text(
        json.dumps({"dataframe_split": {"columns": ["image", "output"], "data": [[str(ct), str(mask)]]}})
    )
    answer = tmp_path / "answer.json"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli), "models", "predict", "-m", f"models:/{NAME}/1", "-i", str(request), "-o", str(answer)]
    done = subprocess.run(
        [*command, "--env-manager", "local"], env=_env(uri), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(answer.read_text())["predictions"]
    assert rows == [{"image": str(ct), "mask": str(mask), "error": ""}]
    _same_mask(mask, expected, ct)


def test_a_table_without_the_output_column_is_refused_in_one_line(trained, tmp_path):
    import pandas as pd

    from pipeline.errors import Seg3dError
    from pipeline.mlflow_model import Seg3dModel
    from pipeline.tracking.store import download_artifacts

    uri, _ = trained
    folder = download_artifacts(f"models:/{NAME}@candidate", tmp_path / "dl", uri)
    model = Seg3dModel(folder)
    with pytest.raises(Seg3dError, match="no column 'output'"):
        model.predict(pd.DataFrame({"image": ["x.nii.gz"]}))
    # A folder of several CTs in one row is refused before any compute.
    several = tmp_path / "several"
    several.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), several / f"c{i}.nii.gz")
    (row,) = model.predict(pd.DataFrame({"image": [str(several)], "output": [str(tmp_path / "o")]})).to_dict("records")
    assert row["mask"] == "" and "holds 2 CTs" in row["error"] and not (tmp_path / "o").exists()
