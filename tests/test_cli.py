"""The CLI's structure: one app with explicit registrations, no Prefect in the core, defaults from the specs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer.main

from dpo_eval.cli.main import app
from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec
from dpo_eval.training.dpo import TrainSpec

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["evaluate", "pairs", "generate", "analyze", "diagnose", "train", "trend", "serve", "demo", "judge",
            "train-reward", "forgetting", "compare", "worker", "export"]
# The Prefect layer: Prefect itself, the flows and tasks (installed as dpo_eval.flows and dpo_eval.tasks), and the
# two command-line modules that register and start flows.
ORCHESTRATION = ("prefect", "dpo_eval.flows", "dpo_eval.tasks", "dpo_eval.cli.main", "dpo_eval.cli.flow_commands")

IMPORTED_AFTER = """
import importlib, json, pkgutil, sys
import dpo_eval
orchestration = {orchestration!r}
for info in pkgutil.walk_packages(dpo_eval.__path__, "dpo_eval."):
    if info.name.startswith(orchestration) or info.name in ("dpo_eval.__main__",):
        continue
    if info.name.startswith("{package}"):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "prefect" or m.startswith(orchestration))))
"""


@pytest.mark.parametrize("package", ["dpo_eval", "dpo_eval.cli"])
def test_importing_every_module_imports_no_flows_tasks_or_prefect(package):
    """Neither the core nor the Prefect-free commands import the Prefect layer (the app and the flow
    commands live in dpo_eval.cli.main and dpo_eval.cli.flow_commands)."""
    script = IMPORTED_AFTER.format(package=package, orchestration=ORCHESTRATION)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_python_m_dpo_eval_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "dpo_eval", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = {line.strip("│ ").split(" ")[0] for line in result.stdout.splitlines()}
    assert set(COMMANDS) <= listed, result.stdout


def test_every_command_is_registered_once_in_the_app():
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert sorted(names) == sorted(COMMANDS)


def test_console_script_and_package_list_name_the_cli_package():
    from importlib.metadata import entry_points

    from setuptools import find_namespace_packages

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["dpo-eval"] == "dpo_eval.cli.main:main"
    listed = set(project["tool"]["setuptools"]["packages"])
    on_disk = {"dpo_eval." + p for p in find_namespace_packages(str(ROOT / "dpo_eval"), exclude=["*.__pycache__"])}
    assert on_disk | {"dpo_eval", "dpo_eval.flows", "dpo_eval.tasks"} == listed, "a folder of dpo_eval is not packaged"
    assert project["tool"]["setuptools"]["package-dir"] == {"dpo_eval.flows": "flows", "dpo_eval.tasks": "tasks"}
    installed = entry_points(group="console_scripts", name="dpo-eval")
    assert [e.value for e in installed] == ["dpo_eval.cli.main:main"], "reinstall: pip install --no-deps -e ."


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {param.name: param for param in group.commands[command].params}


@pytest.mark.parametrize("command, option, spec, field", [
    ("pairs", "fmt", DatasetSpec, "format"),
    ("pairs", "seed", DatasetSpec, "seed"),
    ("pairs", "valid_fraction", DatasetSpec, "valid_fraction"),
    ("generate", "quantization", ModelSpec, "quantization"),
    ("generate", "compute_dtype", ModelSpec, "compute_dtype"),
    ("generate", "max_new_tokens", GenerationSpec, "max_new_tokens"),
    ("generate", "batch_size", GenerationSpec, "batch_size"),
    ("generate", "engine", GenerationSpec, "engine"),
    ("generate", "merge", GenerationSpec, "merge"),
    ("analyze", "alpha", AnalysisSpec, "alpha"),
    ("analyze", "bootstrap", AnalysisSpec, "bootstrap"),
    ("analyze", "seed", AnalysisSpec, "seed"),
    ("train", "steps", TrainSpec, "steps"),
    ("train", "lr", TrainSpec, "learning_rate"),
    ("train", "quantization", TrainSpec, "quantization"),
    ("train", "sft_adapter", TrainSpec, "sft_adapter"),
    ("generate", "reference_adapter", ModelSpec, "reference_adapter"),
    ("forgetting", "reference_adapter", ModelSpec, "reference_adapter"),
])
def test_option_defaults_and_help_come_from_the_spec(command, option, spec, field):
    param = _params(command)[option]
    assert param.default == spec.model_fields[field].default
    assert param.help.startswith(spec.model_fields[field].description)


@pytest.mark.parametrize("option, spec, field", [
    ("quantization", ModelSpec, "quantization"),
    ("max_new_tokens", GenerationSpec, "max_new_tokens"),
    ("engine", GenerationSpec, "engine"),
    ("shard_size", EvalConfig, "shard_size"),
    ("alpha", AnalysisSpec, "alpha"),
])
def test_evaluate_options_override_the_config_and_state_the_spec_default(option, spec, field):
    """evaluate's options default to None (so --config decides); the help gives the spec's default."""
    param = _params("evaluate")[option]
    assert param.default is None
    assert spec.model_fields[field].description in param.help
    assert f"Default: {spec.model_fields[field].default}." in param.help


def test_demo_default_base_is_the_shared_model_beside_the_checkout(stories260k, tmp_path, monkeypatch):
    """`make demo` passes no --base: the default must find ../shared/models/stories260k beside the checkout, from
    the checkout's folder and from any other working folder (a wrong parents[] index once broke `make demo`)."""
    from dpo_eval.cli.flow_commands import _default_base

    monkeypatch.delenv("DPO_EVAL_DEMO_BASE", raising=False)
    checkout = Path(__file__).resolve().parents[1]
    if stories260k.resolve() != (checkout.parent / "shared/models/stories260k").resolve():
        pytest.skip("the shared folder is not beside this checkout (DPO_EVAL_SHARED points elsewhere)")
    for folder in (checkout, tmp_path):
        monkeypatch.chdir(folder)
        assert Path(_default_base()).resolve() == stories260k.resolve(), folder
