"""What rank 0 refuses before any compute: a dataset with errors, a tracking server that does not answer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import Seg3dError
from pipeline.synthetic import synthesize
from pipeline.train import train
from tests.mlflow_server import free_port
from tests.pipeline._training import phantom_data, tiny_cfg


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


def test_an_unreachable_server_fails_before_any_compute(phantom, tmp_path):
    with pytest.raises(Seg3dError, match="does not answer"):
        train(tiny_cfg(), phantom, tmp_path / "run", tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder behind"


def test_a_dataset_with_errors_is_refused_naming_check_data(tmp_path):
    data = tmp_path / "data"
    synthesize(data, cases=2, seed=0, test_cases=1)
    label = data / "labelsTr" / "pancreas_002.nii.gz"
    img = nib.load(label)
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), label)
    with pytest.raises(Seg3dError, match=r"1 problem\(s\), first: pancreas_002: .*seg3d check-data"):
        train(tiny_cfg(), data, tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "run").exists(), "a refused run leaves no folder behind"
