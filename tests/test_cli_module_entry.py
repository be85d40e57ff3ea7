"""``python -m moeguard.cli`` and ``python -m moeguard`` run the same command line as the ``moeguard`` script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moeguard import __version__


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["moeguard.cli", "moeguard"])
def test_module_entry_points_parse_run_and_report_like_the_script(module, tmp_path):
    version = run_module(module, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"moeguard {__version__}"

    helped = run_module(module, "realign", "--help")
    assert helped.returncode == 0 and "--acquisition" in helped.stdout and "usage: moeguard realign" in helped.stdout

    # A user error goes through the same handler: exit code 2, a message naming the command, no traceback.
    missing = tmp_path / "no-such-model"
    failed = run_module(module, "realign", "--model", str(missing), "--task", "addition", "--budget", "4",
                        "--out", str(tmp_path / "out"))
    assert failed.returncode == 2, failed.stderr
    assert "moeguard realign: error:" in failed.stderr and "Traceback" not in failed.stderr
