"""The pipeline's imports point down its layers, and the library stays plain PyTorch."""
import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
LAYERS = {"": 0, "data": 1, "inference": 2, "evaluation": 3, "training": 4, "orchestration": 5}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 and parts[1] in LAYERS else 0


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("path", sorted((PROJECT / "pipeline").rglob("*.py")), ids=lambda p: _module(p))
def test_pipeline_imports_point_down(path):
    own = _layer(_module(path))
    known = {_module(p) for p in (PROJECT / "pipeline").rglob("*.py")}
    upward = sorted(name for name in _imports(path) if name in known and _layer(name) > own)
    assert not upward, f"{_module(path)} (layer {own}) imports {upward} from above"


@pytest.mark.parametrize("path", sorted((PROJECT / "aploss").glob("*.py")), ids=lambda p: p.name)
def test_the_library_never_imports_the_pipeline_ray_or_mlflow(path):
    roots = {name.split(".")[0] for name in _imports(path)}
    assert not roots & {"pipeline", "ray", "mlflow", "jobs"}


# The names of a run's files, which only pipeline/run_folder.py spells out.
RUN_FILES = ("metrics.jsonl", "run.json", "stopped.json", "mlflow.db", "mlartifacts", "-best.yaml")


@pytest.mark.parametrize("path", sorted((PROJECT / "pipeline").rglob("*.py")), ids=lambda p: _module(p))
def test_the_run_folder_alone_spells_a_runs_layout(path):
    if path.name == "run_folder.py":
        return
    strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not [name for name in RUN_FILES for text in strings if name in text and "\n" not in text]
