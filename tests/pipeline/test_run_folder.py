"""RUN_DIR's lock and the refusal of a folder that already holds a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import Seg3dError
from pipeline.run_folder import RunLock
from pipeline.train import train
from tests.pipeline._training import phantom_data, tiny_cfg

# A process that takes the lock, says so, and waits to be killed.
HOLD = (
    "import sys, time; from pathlib import Path; from pipeline.run_folder import RunLock; "
    "lock = RunLock(Path(sys.argv[1])); lock.__enter__(); print('locked', flush=True); time.sleep(600)"
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_data(tmp_path_factory.mktemp("train_data"))


def test_a_second_training_on_the_same_folder_is_refused(phantom, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir), pytest.raises(Seg3dError, match="in use by another training"):
        train(tiny_cfg(), phantom, run_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    (run_dir / "config.yaml").write_text("model: {name: unet}\n")
    with pytest.raises(Seg3dError, match="already holds a training run; pass --resume"):
        train(tiny_cfg(), phantom, run_dir, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"], "nothing was overwritten"


def test_a_lock_left_by_a_process_killed_with_sigkill_does_not_block(tmp_path):
    """SIGKILL runs no cleanup: the lock must be one the kernel drops with its holder, not a file that stays."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Seg3dError) as refused, RunLock(tmp_path):
            pass
        assert str(refused.value) == (
            f"{tmp_path} is in use by another training (lock {tmp_path / '.lock'}); "
            "wait for it to end or choose another --output"
        )
        assert (tmp_path / ".lock").read_text() == str(holder.pid), "the lock file names its holder"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert holder.returncode == -9 and (tmp_path / ".lock").exists(), "the killed holder left its lock file"
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    with RunLock(tmp_path):  # and released on exit
        pass
