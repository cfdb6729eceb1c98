"""The layout the README promises: stages import only their own stage or earlier ones."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# pipeline/'s stage packages in the order of the flow; train and score are two branches
# after ingest and must not import each other.
STAGES = {"ingest": 0, "train": 1, "score": 1, "outputs": 2, "jobs": 3, "cli": 4}


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "pipeline" and parts[1] in STAGES else None


def _python_files(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _python_files("pipeline"), ids=lambda p: p.name)
def test_pipeline_modules_import_no_later_stage(path: pathlib.Path) -> None:
    relative = path.relative_to(ROOT)
    own = relative.parts[1] if len(relative.parts) > 2 else None
    for module in _imported_modules(path):
        stage = _stage(module)
        if own is None or stage is None or stage == own:
            continue
        assert STAGES[stage] < STAGES[own], f"{relative} imports {module}, a later stage"


@pytest.mark.parametrize("folder", ["vae", "pipeline", "benchmarks"])
def test_nothing_imports_the_cli_and_vae_imports_no_pipeline(folder: str) -> None:
    for path in _python_files(folder):
        for module in _imported_modules(path):
            if folder != "pipeline" or path.parent.name != "cli":
                assert _stage(module) != "cli", f"{path.relative_to(ROOT)} imports {module}"
            if folder == "vae":
                assert module.split(".")[0] not in ("pipeline", "benchmarks"), path


def test_every_pipeline_module_is_in_a_stage() -> None:
    loose = [p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert {
        p.name for p in (ROOT / "pipeline").iterdir() if p.is_dir() and p.name != "__pycache__"
    } == set(STAGES)
