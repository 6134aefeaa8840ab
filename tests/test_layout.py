"""The layout holds: one folder per stage, imports that only run down the layers, no module named after its folder,
and no import of the repository's flows/ or tasks/ folders by their top-level names (they install as
dpo_eval.flows and dpo_eval.tasks; importing both names would load every flow twice)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers before it, never a later one. The foundation is the
# plain modules at dpo_eval's top that every stage shares; `stages` holds the run directory's stages, above the
# stages it calls, and `preflight` the checks before a run, above every stage whose input it checks.
FOUNDATION = ("dpo_eval.errors", "dpo_eval.config", "dpo_eval.jsonsafe", "dpo_eval.progress", "dpo_eval.locations",
              "dpo_eval.checkpoint_meta", "dpo_eval.reference", "dpo_eval.sqlite_table", "dpo_eval.identity",
              "dpo_eval.__init__", "dpo_eval.__main__")
LAYERS = [FOUNDATION, ("dpo_eval.data",), ("dpo_eval.generation",), ("dpo_eval.scoring",), ("dpo_eval.stats",),
          ("dpo_eval.stages",), ("dpo_eval.judges",), ("dpo_eval.forgetting",), ("dpo_eval.preflight",),
          ("dpo_eval.training",), ("dpo_eval.report",), ("dpo_eval.studies",), ("dpo_eval.tasks",),
          ("dpo_eval.flows",), ("dpo_eval.cli",)]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("flows", "tasks"):
        parts = ["dpo_eval", *parts]
    return ".".join(parts).removesuffix(".__init__") if parts[-1] == "__init__" and len(parts) > 2 else ".".join(parts)


def _sources() -> list[Path]:
    return sorted(p for folder in ("dpo_eval", "flows", "tasks") for p in (ROOT / folder).rglob("*.py"))


def _layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it to the layer it belongs to")


def _imports(path: Path) -> list[str]:
    """Every dpo_eval module `path` imports, at its top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dpo_eval":
                found += [f"dpo_eval.{a.name}" for a in node.names]
            elif node.module.startswith("dpo_eval."):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("dpo_eval.")]
    return found


def test_every_module_is_in_a_layer():
    for path in _sources():
        _layer(_module_name(path))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_run_down_the_layers(path):
    module = _module_name(path)
    upward = [imported for imported in _imports(path) if _layer(imported) > _layer(module)]
    assert upward == [], f"{module} imports a higher layer: {upward}"


def test_the_core_never_imports_prefect():
    for path in _sources():
        module = _module_name(path)
        if _layer(module) >= _layer("dpo_eval.tasks") or module.startswith("dpo_eval.cli"):
            continue
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if n.split(".")[0] == "prefect"], f"{module} imports prefect"


def test_no_module_repeats_its_folder_as_a_prefix():
    for path in _sources():
        folder = path.parent.name
        if folder in ("dpo_eval",):
            continue
        assert not path.stem.startswith(folder.rstrip("s") + "_") and path.stem != folder, path


def test_nothing_imports_flows_or_tasks_by_their_folder_names():
    paths = _sources() + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py")) \
        + sorted((ROOT / "deployments").rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            bad = [n for n in names if n.split(".")[0] in ("flows", "tasks", "dpo_eval_cli")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}: use dpo_eval.flows / dpo_eval.tasks / dpo_eval.cli"
