"""scripts/setup on a system Python that refuses global installs (PEP 668): it makes and uses a project .venv.

The base interpreter is wrapped so that `python3 -m pip` fails exactly as Debian 12 / Ubuntu 24.04 make it fail
(externally-managed-environment); `-m venv` works. setup must never ask the system Python to install anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

REFUSING_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "error: externally-managed-environment" >&2
  exit 1
fi
exec {base} "$@"
"""


@pytest.mark.e2e
@pytest.mark.timeout(900)  # three real runs of scripts/setup, one installing torch: minutes on a loaded machine
def test_setup_creates_and_uses_a_project_venv_on_an_externally_managed_python(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
        ".hypothesis", "node_modules"))
    base = getattr(sys, "_base_executable", sys.executable)
    wrapper = tmp_path / "python3"
    wrapper.write_text(REFUSING_PYTHON.format(base=base))
    wrapper.chmod(0o755)
    assert subprocess.run([str(wrapper), "-m", "pip", "--version"], capture_output=True).returncode == 1
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PYTHON"] = str(wrapper)

    first = subprocess.run([str(checkout / "scripts" / "setup")], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    venv_python = checkout / ".venv" / "bin" / "python"
    assert first.stdout.strip().splitlines()[-1] == str(venv_python)
    assert "creating the project virtual environment .venv" in first.stderr
    assert "installing trainhealth[trainer] from this checkout" in first.stderr
    check = subprocess.run([str(venv_python), "-c", "import torch, trainhealth, trainhealth.trainer.client; "
                            "print(torch.__version__, trainhealth.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    version, where = check.stdout.split()
    assert version.startswith("2.13.0") and where == str(checkout / "monitor" / "__init__.py")

    # idempotent: a second run reuses the venv and creates nothing
    again = subprocess.run([str(checkout / "scripts" / "setup")], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "creating" not in again.stderr and "installing" not in again.stderr  # nor pip install -e (its stamp)

    # an active virtual environment is used instead of .venv
    active = dict(env, VIRTUAL_ENV=str(checkout / ".venv"))
    third = subprocess.run([str(checkout / "scripts" / "setup")], cwd=tmp_path, env=active, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0 and "using the active virtual environment" in third.stderr
