"""The package installs as ``trainhealth`` only: a user's own trainer.py / monitor.py never collide with it.

Run from a folder holding a user's ``trainer.py`` and ``monitor.py`` that fail loudly when imported, against
both the editable install the suite runs on and a plain (non-editable) ``pip install .`` of this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every module of the package, imported by name: a folder missing from pyproject's package list fails here.
IMPORTS = """
import importlib, pkgutil, sys
import trainhealth
from trainhealth import Telemetry
assert Telemetry.__module__ == "trainhealth.trainer.client", Telemetry.__module__
names = [m.name for m in pkgutil.walk_packages(trainhealth.__path__, "trainhealth.")
         if ".integrations" not in m.name]
for name in names:
    if name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except ImportError as exc:  # torch-only modules where torch is missing would show here
        if exc.name not in ("torch", "pynvml", "transformers", "lightning"):
            raise
assert "trainer" not in sys.modules and "monitor" not in sys.modules, "a user's module was imported"
print("modules", len(names), trainhealth.__file__)
"""

USER_MODULE = 'raise SystemExit("the user\'s own {name}.py was imported by trainhealth")\n'


@pytest.fixture()
def user_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("trainer", "monitor"):
        (project / f"{name}.py").write_text(USER_MODULE.format(name=name))
    return project


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _check(cwd: Path, env: dict[str, str], where: str) -> None:
    out = _run([sys.executable, "-c", IMPORTS], cwd, env)
    assert out.startswith("modules ") and where in out.split()[-1], out
    # the CLI, as a module and as the console script, from the user's folder
    assert "serve" in _run([sys.executable, "-m", "trainhealth", "--help"], cwd, env)
    script = Path(sys.executable).with_name("trainhealth")
    if script.exists():
        assert "replay" in _run([str(script), "--help"], cwd, env)
    # the reference trainer's entry point resolves under the namespace
    assert "--steps" in _run([sys.executable, "-m", "trainhealth.trainer", "--help"], cwd, env)


def test_editable_install_ignores_the_users_trainer_and_monitor(user_project: Path) -> None:
    _check(user_project, _env(), str(ROOT / "monitor"))
    # and with the user's folder first on the path, as `python train.py` in that folder puts it
    _check(user_project, _env(str(user_project)), str(ROOT / "monitor"))


def test_plain_install_has_every_module_under_trainhealth(user_project: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = tmp_path / "src"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build",
                                                                "__pycache__", ".mypy_cache", ".ruff_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(site), str(build)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", "-info")))
    assert installed == ["bin", "trainhealth"] or installed == ["trainhealth"], installed
    assert (site / "trainhealth" / "trainer" / "client.py").exists()
    assert (site / "trainhealth" / "detectors" / "liveness.py").exists()
    # the page's package data (pyproject's [tool.setuptools.package-data]): the script and styles it inlines
    assets = site / "trainhealth" / "page" / "assets"
    assert sorted(p.name for p in assets.iterdir()) == ["charts.js", "page.css", "page.js", "report.js"]
    assert (site / "trainhealth" / "integrations" / "hf.py").exists()  # trainer/integrations, mapped
    assert (site / "trainhealth" / "integrations" / "lightning.py").exists()
    _check(user_project, _env(str(site)), str(site / "trainhealth"))
    out = _run([sys.executable, "-c", ASSETS], user_project, _env(str(site)))
    assert out.split() == ["ok", str(site / "trainhealth" / "page" / "html.py")], out


# The installed page reads its assets from the installed package (not from this checkout) and inlines them.
ASSETS = """
from trainhealth.page import html
for name in ("charts.js", "page.js", "report.js", "page.css"):
    assert len(html.asset(name)) > 100, name
assert "TH.drawCharts" in html.page({"runs": [], "chosen": None})
print("ok", html.__file__)
"""
