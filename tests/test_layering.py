"""The module map's import rules, checked on the source (import-linter's contract, by AST).

* packages import only downwards: jobs -> infra -> trainer -> {embeddings | adapters} -> mdlora
  (base modules), each as ``mdlora.<package>`` (never the bare folder name);
* ``ray`` is imported only in ``infra/``; ``mlflow`` and ``tensorboardX`` only in ``infra/tracking.py``;
* model math (``trainer/backbone.py``, ``trainer/task.py``, ``adapters/lora.py``,
  ``adapters/multilora.py``, ``adapters/wide.py``) imports neither torch.distributed nor Ray nor I/O layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"jobs": 4, "infra": 3, "trainer": 2, "embeddings": 1, "adapters": 1, "mdlora": 0}
PURE = ["trainer/backbone.py", "trainer/task.py", "adapters/lora.py", "adapters/multilora.py", "adapters/wide.py"]


def imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def sources() -> list[Path]:
    return [p for pkg in LAYERS for p in sorted((ROOT / pkg).rglob("*.py"))]


def layer_of(name: str) -> str | None:
    """The package of an imported module name: ``mdlora.infra.score`` -> ``infra``; a base module
    (``mdlora.config``) -> ``mdlora``; anything else (torch, ray, ...) -> None."""
    parts = name.split(".")
    if parts[0] != "mdlora":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "mdlora"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_downwards(path):
    pkg = path.relative_to(ROOT).parts[0]
    for name in imports(path):
        top = layer_of(name)
        assert name.split(".")[0] not in set(LAYERS) - {"mdlora"}, (
            f"{path.relative_to(ROOT)} imports {name}: the packages import as mdlora.{name}")
        if top is not None and top != pkg:
            assert LAYERS[top] < LAYERS[pkg], f"{path.relative_to(ROOT)} imports {name} (upwards or sideways)"
        if name.split(".")[0] == "ray":
            assert pkg == "infra", f"{path.relative_to(ROOT)} imports ray outside infra/"


def test_only_the_tracking_module_imports_mlflow_and_tensorboardx():
    users = {str(p.relative_to(ROOT)) for p in sources()
             if any(n.split(".")[0] in ("mlflow", "tensorboardX") for n in imports(p))}
    assert users == {"infra/tracking.py"}, users


@pytest.mark.parametrize("rel", PURE)
def test_model_math_is_free_of_distribution_and_io(rel):
    for name in imports(ROOT / rel):
        assert not name.startswith(("torch.distributed", "ray", "mdlora.infra", "pyarrow", "s3fs", "fsspec")), (
            f"{rel} imports {name}")


# ---- stages side by side; one owner of what we publish ----------------------------------------

STAGES = ["pretrain", "adapt", "score", "retrain", "submit"]
"""Pipeline stages (``infra/<stage>.py``). They share :mod:`mdlora.infra.artifacts` and
:mod:`mdlora.infra.runs`; only the retrain orchestrates others, through public names."""
ORCHESTRATOR = "retrain"


def imported_names(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in ``path``."""
    return [(node.module, a.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module for a in node.names]


@pytest.mark.parametrize("stage", STAGES)
def test_stages_do_not_import_each_other(stage):
    path = ROOT / "infra" / f"{stage}.py"
    others = {f"mdlora.infra.{s}" for s in STAGES if s != stage}
    for module in imports(path):
        if module in others:
            assert stage == ORCHESTRATOR, f"infra/{stage}.py imports the stage {module}"
    for module, name in imported_names(path):
        if module in others:
            assert not name.startswith("_"), f"infra/{stage}.py uses {module}.{name}, not a public entry point"


def test_a_stage_importing_another_stage_is_caught(tmp_path, monkeypatch):
    (tmp_path / "infra").mkdir()
    (tmp_path / "infra" / "score.py").write_text("from mdlora.infra.adapt import SHARED\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports the stage mdlora.infra.adapt"):
        test_stages_do_not_import_each_other("score")


def published_names() -> dict[str, str]:
    """The layout's file names and key prefixes, but the backbone's ``schema.yaml`` (log datasets
    carry a file of that name too, written by their own writers)."""
    from mdlora.infra.artifacts import layout

    return {v: k for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in v
            and k != "BACKBONE_SCHEMA"}


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_published_names_are_spelled_only_in_the_layout(path):
    if path == ROOT / "infra" / "artifacts" / "layout.py":
        return
    names = published_names()
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for value, const in names.items():
                assert value not in node.value, (
                    f"{path.relative_to(ROOT)} spells {value!r}: use mdlora.infra.artifacts.layout.{const}")


def test_the_ray_rule_sees_ray_imports():
    """The rule above has something to check: the Ray edge's own imports are found."""
    assert any(n.split(".")[0] == "ray" for n in imports(ROOT / "infra" / "ray_backend.py"))
