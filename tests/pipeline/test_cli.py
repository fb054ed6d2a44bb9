from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.cli import main


def test_models_lists_every_variant_with_its_plug_points(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "attention_unet" in out and "skip=gate" in out
    assert "danet" in out and "pam4, cam4" in out
    assert "encnet" in out and "se4" in out


def test_model_info_builds_runs_and_reports(capsys):
    assert main(["model-info", "--model", "danet", "--patch", "32", "--channels", "4,8,16"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 1, 32, 32, 32) -> logits (1, 3, 32, 32, 32)" in out
    assert "train-mode outputs: logits, pam2, cam2" in out


def test_unknown_model_is_one_line_and_exit_code_2():
    """Through the installed console script, as a user runs it: one line on stderr, no traceback."""
    exe = shutil.which("seg3d", path=str(Path(sys.executable).parent))
    assert exe, "the console script seg3d is not installed in this environment"
    proc = subprocess.run([exe, "model-info", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("seg3d model-info: error: unknown model 'nope'; valid models: attention_unet")
    assert "Traceback" not in proc.stderr
