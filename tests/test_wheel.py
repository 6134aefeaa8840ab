"""The built wheel installs anywhere: one top-level import name (dpo_eval), and the installed package, outside the
repository, runs the command line, reads a real data set and resolves deployments/prefect.yaml's entrypoints.

The wheel is built from this checkout with the test venv's setuptools (no build isolation: no network) and installed
into a fresh venv outside the repository whose only other packages are the test venv's, reached through a .pth file
(so nothing is downloaded, and the repository's editable install is not on that venv's path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import polars as pl
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the wheel, the fresh venv's bin folder, an environment without the repository on any path)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: an in-tree build/ would be left in the checkout and reused by later builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".lock-venv", "runs", "build", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", "tests", "benchmarks"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(work / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("dpo_eval-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                          "--no-index", "--quiet", str(wheel)], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return wheel, venv / "bin", env, work


def test_the_wheel_has_one_top_level_name(installed):
    wheel = installed[0]
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"dpo_eval"}, top
    assert "dpo_eval/flows/evaluate.py" in names and "dpo_eval/tasks/evaluation.py" in names
    assert "dpo_eval/report/page.html.j2" in names  # the report's template is package data
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: MIT" in metadata and "Classifier: " in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_installed_command_runs_outside_the_repository(installed, orca_jsonl):
    _, bin_dir, env, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c", "import dpo_eval; print(dpo_eval.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(work / "venv"), where.stdout  # the wheel's copy, not the checkout
    helped = subprocess.run([str(bin_dir / "dpo-eval"), "--help"], cwd=work, env=env, capture_output=True, text=True,
                            timeout=300)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "evaluate" in helped.stdout and "judge" in helped.stdout
    out = work / "pairs.parquet"
    paired = subprocess.run([str(bin_dir / "dpo-eval"), "pairs", "--dataset", str(orca_jsonl), "--out", str(out)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert paired.returncode == 0, paired.stderr[-3000:]
    frame = pl.read_parquet(out)
    assert frame.height > 0 and {"pair_id", "split", "prompt", "chosen", "rejected"} <= set(frame.columns)


def test_prefect_yaml_entrypoints_resolve_in_the_installed_package(installed):
    _, bin_dir, env, work = installed
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    entrypoints = [d["entrypoint"] for d in spec["deployments"]]
    script = ("import sys\nfrom prefect.flows import load_flow_from_entrypoint\n"
              "for e in sys.argv[1:]:\n    f = load_flow_from_entrypoint(e)\n"
              "    print(e, f.name, f.fn.__module__, sys.modules[f.fn.__module__].__file__)\n")
    loaded = subprocess.run([str(bin_dir / "python"), "-c", script, *entrypoints], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = loaded.stdout.strip().splitlines()
    assert len(lines) == len(entrypoints)
    for line in lines:
        assert Path(line.split()[-1]).is_relative_to(work / "venv"), line
