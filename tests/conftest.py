from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"


def pytest_configure(config):
    # What seg3d's main() does for a real command: the machines are offline, and MLflow reads this when it is first
    # imported, which a test module may do at collection.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# The files that take minutes, longest first: `make test` runs whole files on two workers (pytest-xdist), and one
# of these started last would leave the other worker idle for its length. Within a file the order is unchanged.
LONG_FILES = (
    "tests/pipeline/test_faults.py",
    "tests/pipeline/test_demo.py",
    "tests/pipeline/study/test_study.py",
    "tests/test_image.py",
    "tests/pipeline/test_train.py",
    "tests/pipeline/test_distributed.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FILES)))  # stable: the rest as collected
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        pytest.skip(f"real CT data not found at {REAL_CT} (it sits beside the repository as ../shared/data/real_ct)")
    return REAL_CT


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """URI of a real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts), shared by the session.

    Tests must not assume an empty server: create experiments and runs with names of their own.
    """
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server.start()
    finally:
        server.stop()
